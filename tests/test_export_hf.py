"""
The Hugging Face export: a small random model with every architecture feature on, exported and loaded back
through transformers' Auto classes, must compute what our GPT computes, generate what it generates, tokenize
as our tokenizer does and render chats as our chat format does. (fp32 on CPU, as conftest sets.)
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, pretrain_texts
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import UserError
from nanochat.gpt import build_gpt
from helpers import tiny_config
from scripts import export_hf

transformers = pytest.importorskip("transformers", reason="the export needs the [hf] extra: pip install -e '.[hf]'")

SEQUENCE_LEN = 64  # prompts of 40 tokens plus 32 new ones run past every window

RECIPE_2026 = dict(rotary_base=100000.0, qk_scale=1.2, short_window=16, ve_gate_channels=12, ve_gate_scale=3.0,
                   smear=True, backout=True)


def random_model(vocab_size, january=False):
    """A 4-layer model with GQA, value embeddings on layers 1 and 3, a short (16) and a long (64) window, every 2026
    architecture field off its January value (smear and backout on; january=True: the config of a checkpoint that
    predates them), and every parameter moved off its init (zero projections, gates, lambdas would hide mistakes)."""
    config = tiny_config(sequence_len=SEQUENCE_LEN, vocab_size=vocab_size, n_layer=4, n_head=4, window_pattern="SL",
                         **({} if january else RECIPE_2026))
    torch.manual_seed(0)
    model = build_gpt(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if not january:
            model.smear_lambda.fill_(0.5)  # mix in half of the gated previous token
            model.backout_lambda.fill_(0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """(our model, our tokenizer, transformers model, transformers tokenizer, export dir)."""
    model = random_model(tiny_tokenizer.get_vocab_size())
    out = tmp_path_factory.mktemp("export") / "model"
    export_hf.export(model, tiny_tokenizer, {}, str(out))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf_model.generation_config.eos_token_id = None  # a random model may say <|assistant_end|>: generate on
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    return model, tiny_tokenizer, hf_model, hf_tokenizer, out


def test_export_folder_stands_alone(exported):
    _, tokenizer, *_, out = exported
    assert sorted(os.listdir(out)) == ["config.json", "configuration_nanochat.py", "generation_config.json",
                                       "model.safetensors", "modeling_nanochat.py", "tokenizer.json",
                                       "tokenizer_config.json"]
    for name in export_hf.CODE_FILES:  # the folder must load where nanochat is not installed
        code = (out / name).read_text()
        assert "import nanochat" not in code and "from nanochat" not in code
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert config["window_sizes"] == [16, 64, 16, 64] and config["value_embed_layers"] == [1, 3]
    assert config["smear"] and config["backout"] and config["qk_scale"] == 1.2 and config["ve_gate_channels"] == 12
    hf_model, hf_tokenizer = exported[2:4]
    assert hf_model.config.max_position_embeddings == SEQUENCE_LEN  # the training context, as clients read it
    assert hf_tokenizer.pad_token == "<|assistant_end|>" and hf_tokenizer.padding_side == "left"


def test_weights_round_trip_exactly(exported):
    model, _, hf_model, _, _ = exported
    ours, theirs = model.state_dict(), hf_model.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert theirs[key].dtype == torch.float32 and torch.equal(ours[key].float(), theirs[key]), key


def test_logits_match(exported):
    model, _, hf_model, _, _ = exported
    ids = torch.randint(0, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.shape == ours.shape == (2, 60, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_cached_chunks_match_one_pass(exported):
    """Prefill in two chunks, then single tokens, through the cache (windows, positions, smear's carried
    embedding at each chunk's first token) gives the logits of one pass over the whole sequence."""
    model, _, hf_model, _, _ = exported
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        out = hf_model(ids[:, :20], use_cache=True)
        chunks, cache = [out.logits], out.cache
        for start, end in [(20, 45)] + [(t, t + 1) for t in range(45, 50)]:
            out = hf_model(ids[:, start:end], cache=cache, use_cache=True)
            chunks.append(out.logits)
    assert (full - torch.cat(chunks, dim=1)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_greedy_generation_matches(exported):
    """32 greedy tokens after a 40-token prompt (past every window and past sequence_len) with transformers'
    generate and its KV cache, for two rows at once, equal our naive generation token for token."""
    model, _, hf_model, _, _ = exported
    prompts = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    generated = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False)
    for row, prompt in enumerate(prompts.tolist()):
        ours = list(model.generate(prompt, max_tokens=32, temperature=0))
        assert generated[row, 40:].tolist() == ours


def padded_batch(rows, pad_id, side):
    """Rows of different lengths padded to one (B, L) batch on the given side -> (ids, attention_mask, slices)."""
    L = max(len(row) for row in rows)
    ids, mask = torch.full((len(rows), L), pad_id), torch.zeros(len(rows), L, dtype=torch.long)
    slices = [slice(L - len(row), L) if side == "left" else slice(0, len(row)) for row in rows]
    for i, (row, where) in enumerate(zip(rows, slices)):
        ids[i, where], mask[i, where] = torch.tensor(row), 1
    return ids, mask, slices


def random_rows(vocab_size, lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_row_alone(exported, side):
    """Rows of 60, 35, 17 and 1 tokens padded to one batch: each row's logits are those of the row alone, so no
    real token sees a pad (the pad id's embedding would be smear's "previous token" of a left-padded row's first
    token), and windows are measured over real tokens only."""
    model, _, hf_model, hf_tokenizer, _ = exported
    rows = random_rows(model.config.vocab_size, [60, 35, 17, 1], seed=6)
    ids, mask, slices = padded_batch(rows, hf_tokenizer.pad_token_id, side)
    with torch.no_grad():
        logits = hf_model(ids, attention_mask=mask).logits
        for row, where, row_logits in zip(rows, slices, logits):
            assert (row_logits[where] - model(torch.tensor([row]))[0]).abs().max().item() < 1e-4
        assert torch.isfinite(logits).all()  # pad positions too: a NaN there would spread through the values


def test_padding_between_cached_chunks(exported):
    """A right-padded first chunk, then more tokens through the cache: the pads sit between each row's real
    tokens, and the continuation's logits are still those of the row alone (positions, windows and smear's
    carried embedding skip the pads)."""
    model, _, hf_model, hf_tokenizer, _ = exported
    vocab_size = model.config.vocab_size
    prompts = random_rows(vocab_size, [30, 12, 3], seed=7)
    continuation = torch.randint(0, vocab_size, (3, 20), generator=torch.Generator().manual_seed(8))
    ids, mask, _ = padded_batch(prompts, hf_tokenizer.pad_token_id, "right")
    with torch.no_grad():
        cache = hf_model(ids, attention_mask=mask, use_cache=True).cache
        mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
        logits = hf_model(continuation, attention_mask=mask, cache=cache, use_cache=True).logits
        for prompt, new, row_logits in zip(prompts, continuation.tolist(), logits):
            alone = model(torch.tensor([prompt + new]))[0, len(prompt):]
            assert (row_logits - alone).abs().max().item() < 1e-4


def test_rotary_positions_start_at_each_rows_first_real_token(exported, monkeypatch):
    """Scores depend on relative positions only, up to the rounding of the bf16 rotary tables, so the logits
    alone would hardly show a shifted row: check the positions the rotary embedding gets."""
    model, _, hf_model, hf_tokenizer, _ = exported
    modeling = sys.modules[type(hf_model).__module__]
    seen = []
    rotary_cos_sin = modeling.rotary_cos_sin
    monkeypatch.setattr(modeling, "rotary_cos_sin", lambda positions, *args: (seen.append(positions),
                                                                               rotary_cos_sin(positions, *args))[1])
    ids, mask, slices = padded_batch(random_rows(model.config.vocab_size, [9, 4], seed=9), 0, "left")
    with torch.no_grad():
        cache = hf_model(ids, attention_mask=mask, use_cache=True).cache
        hf_model(ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
                 cache=cache, use_cache=True)
    prefill, step = seen
    assert prefill[0].tolist() == list(range(9)) and prefill[1, slices[1]].tolist() == list(range(4))
    assert step.tolist() == [[9], [4]]


def test_left_padded_generate_matches_one_prompt_at_a_time(exported):
    """Prompts of 40, 25, 10 and 3 tokens, left-padded by the exported tokenizer, 32 greedy tokens each through
    generate's KV cache (past every window): each row equals our naive generation of its prompt alone."""
    model, _, hf_model, hf_tokenizer, _ = exported
    prompts = random_rows(model.config.vocab_size, [40, 25, 10, 3], seed=10)
    batch = hf_tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    assert batch["attention_mask"][:, 0].tolist() == [1, 0, 0, 0]  # padded on the left
    generated = hf_model.generate(**batch, max_new_tokens=32, do_sample=False)
    for row, prompt in enumerate(prompts):
        assert generated[row, 40:].tolist() == list(model.generate(prompt, max_tokens=32, temperature=0))


def test_pipeline_batches_like_one_prompt_at_a_time(exported):
    """transformers' text-generation pipeline with batch_size=8 (it pads the batch) writes what it writes for
    each prompt alone."""
    _, _, hf_model, hf_tokenizer, _ = exported
    prompts = ["Hello", "The history of the city begins in", "A", "It was", "Numbers: 1, 2, 3,", "x" * 30,
               "Why is the sky blue?", "In 1492 the ships"]
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer, device="cpu")
    settings = dict(max_new_tokens=16, do_sample=False, return_full_text=False)
    batched = pipe(prompts, batch_size=8, **settings)
    assert [out[0]["generated_text"] for out in batched] == [pipe(p, **settings)[0]["generated_text"] for p in prompts]


def test_positions_come_from_the_mask_only(exported):
    _, _, hf_model, _, _ = exported
    with pytest.raises(ValueError, match="leave position_ids out"):
        hf_model(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(3)[None])


@pytest.mark.slow
def test_beam_search_cache_follows_the_beams(exported):
    """Beam search reorders the cache rows (and smear's carried embedding) as beams swap: each returned beam's
    score must be the sum of its tokens' log-probabilities under one uncached forward pass."""
    model, _, hf_model, _, _ = exported
    prompt = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            num_beams=4, num_return_sequences=4, length_penalty=0.0, output_scores=True,
                            return_dict_in_generate=True)
    assert out.sequences.shape == (4, 32)
    for sequence, score in zip(out.sequences, out.sequences_scores):
        with torch.no_grad():
            logprobs = model(sequence[None, :-1]).log_softmax(-1)[0, 19:]  # the predictions of the 12 new tokens
        assert abs(score.item() - logprobs.gather(-1, sequence[20:, None]).sum().item()) < 1e-3


TEXT = ("<|bos|>Hello world! <|user_start|>What's 12345 + 678?<|user_end|><|assistant_start|>"
        "<|python_start|>12345+678<|python_end|><|output_start|>13023<|output_end|>It is 13023.<|assistant_end|>"
        "  Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂👍🏽, ß→SS \n\n\n\t\t  trailing   spaces   \r\n"
        "numbers 3.14159 2026-11-30 1,000,000 and I'll we've they're DON'T")


def test_tokenizer_ids_match(exported):
    _, tokenizer, _, hf_tokenizer, _ = exported
    bos = tokenizer.get_bos_token_id()
    assert all(name in TEXT for name in tokenizer.get_special_tokens())
    # special-token strings are special tokens to transformers, as to tiktoken with allowed_special="all"
    ids = hf_tokenizer(TEXT).input_ids
    assert ids == [bos] + tokenizer.enc.encode(TEXT, allowed_special="all")
    assert hf_tokenizer.decode(ids[1:]) == TEXT
    # ...and ordinary text when split: our encode() never lets a document inject a special token
    assert hf_tokenizer(TEXT, add_special_tokens=False, split_special_tokens=True).input_ids == tokenizer.encode(TEXT)
    # the merges agree on real text, not just on the sample: documents from the validation shard
    documents = list(pretrain_texts(max_chars=200_000, shard=-1))
    theirs = hf_tokenizer(documents, add_special_tokens=False).input_ids
    assert theirs == tokenizer.encode(documents)


CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 * 34?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "12 * 34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": "It is 408."},
    ]},
    {"role": "user", "content": "Thanks! Say hi in Japanese.\n"},
    {"role": "assistant", "content": "こんにちは 👋"},
]}


def test_chat_template_renders_like_our_tokenizer(exported):
    _, tokenizer, _, hf_tokenizer, _ = exported
    messages = CONVERSATION["messages"]
    ids, mask = tokenizer.render_conversation(CONVERSATION)
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
    assert rendered["input_ids"] == ids
    assert rendered["assistant_masks"] == mask  # the tokens the model learns to write
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.decode(ids)
    prompt = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                              add_generation_prompt=True)["input_ids"]
    assert prompt == tokenizer.render_for_completion(CONVERSATION)
    assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")


def test_chat_template_sanitized_content_matches(exported):
    """A user who writes a special token's text gets text tokens from both, with sanitize_control_tokens."""
    _, tokenizer, _, hf_tokenizer, _ = exported
    conversation = {"messages": [{"role": "user", "content": "end it: <|assistant_end|><|bos|>"},
                                 {"role": "assistant", "content": "no <|user_start|>"}]}
    ids, _ = tokenizer.render_conversation(conversation)
    rendered = hf_tokenizer.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True,
                                                sanitize_control_tokens=True)
    assert rendered["input_ids"] == ids


def test_chat_template_rejects_bad_roles(exported):
    *_, hf_tokenizer, _ = exported
    with pytest.raises(Exception, match="alternate user/assistant"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


def test_unsupported_architecture_is_refused(tiny_tokenizer, tmp_path):
    model = random_model(tiny_tokenizer.get_vocab_size())
    out = tmp_path / "out"
    with pytest.raises(UserError, match="config field.*mystery_gate"):
        export_hf.export(model, tiny_tokenizer, {"mystery_gate": True}, str(out))
    model.register_parameter("mystery_lambda", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(UserError, match="parameter.*mystery_lambda"):
        export_hf.export(model, tiny_tokenizer, {}, str(out))
    assert not out.exists() and os.listdir(tmp_path) == []


def test_failed_export_leaves_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    model = random_model(tiny_tokenizer.get_vocab_size())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        export_hf.export(model, tiny_tokenizer, {}, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]

    def broken(_):
        raise RuntimeError("disk full")
    monkeypatch.setattr(export_hf, "tokenizer_json", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf.export(model, tiny_tokenizer, {}, str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no half-written export, no temp folder


def save_base_checkpoint(base_dir, model, tokenizer, model_config):
    tokenizer.save(str(base_dir / "tokenizer"))
    save_checkpoint(str(base_dir / "base_checkpoints" / "d4"), 7, model.state_dict(), None,
                    {"step": 7, "model_config": model_config})


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "scripts.export_hf", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_exports_a_january_checkpoint(tiny_tokenizer, base_dir, tmp_path):
    """A checkpoint whose saved config predates the 2026 fields exports with their January values."""
    model = random_model(tiny_tokenizer.get_vocab_size(), january=True)
    saved_config = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in RECIPE_2026}
    save_base_checkpoint(base_dir, model, tiny_tokenizer, saved_config)
    result = run_export("-i", "base", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["rotary_base"], config["qk_scale"], config["ve_gate_scale"], config["window_sizes"]) == \
        (10000.0, 1.0, 2.0, [32, 64, 32, 64])
    assert not config["smear"] and not config["backout"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() < 1e-4


@pytest.mark.slow
def test_cli_refuses_unknown_config_field_in_one_line(tiny_tokenizer, base_dir, tmp_path):
    model = random_model(tiny_tokenizer.get_vocab_size())
    save_base_checkpoint(base_dir, model, tiny_tokenizer, {**dataclasses.asdict(model.config), "mystery_gate": True})
    result = run_export("-i", "base", "--out", str(tmp_path / "hf"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: The export does not cover the model config field(s) mystery_gate" in result.stderr
    assert not (tmp_path / "hf").exists()
