"""
Export a checkpoint (any stage) as a Hugging Face transformers model folder that loads offline:

    python -m scripts.export_hf -i sft --out nanochat-d20-sft     # -g TAG, -s STEP pick another checkpoint

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

The folder holds model.safetensors (the trained state dict in fp32, under nanochat's own parameter names),
config.json (every architecture field, with auto_map entries pointing at the two code files copied beside it),
configuration_nanochat.py + modeling_nanochat.py (written for this export: they import transformers and
torch only), generation_config.json (stop on <|assistant_end|> or <|bos|>, as our engine does), and the
tokenizer: tokenizer.json (byte-level BPE with our split regex, merges and special-token ids) plus
tokenizer_config.json with the chat template and the padding (left, with <|assistant_end|>). It is written to
a temp folder and renamed into place at the end, so DIR is either a whole export or absent.

The export refuses a model it does not cover: a config field or parameter it has no mapping for is an error,
never a silently wrong model. Needs the [hf] extra (pip install -e '.[hf]').
"""

import argparse
import dataclasses
import json
import os
import shutil
import tempfile

import torch

import nanochat
from nanochat.checkpoint_manager import STAGE_DIRS, find_checkpoint, load_model
from nanochat.common import UserError, compute_init
from nanochat.gpt import LOGIT_SOFTCAP, SMEAR_CHANNELS
from nanochat.run import add_checkpoint_flags
from nanochat.tokenizer import CONTROL_TOKENS, SPLIT_PATTERN

HF_CODE_DIR = os.path.join(os.path.dirname(nanochat.__file__), "hf")  # the package data copied into the export
CODE_FILES = ["configuration_nanochat.py", "modeling_nanochat.py"]

# Every model config field the export maps (a saved config without one of the 2026 fields means its January
# value, which GPTConfig's defaults give). A field outside this set stops the export: its math is unknown here.
KNOWN_CONFIG_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                       "rotary_base", "qk_scale", "short_window", "ve_gate_channels", "ve_gate_scale", "smear",
                       "backout"}


def check_architecture(model, saved_config):
    """UserError unless the export covers every config field (saved or current) and every parameter of the model."""
    fields = set(saved_config) | {f.name for f in dataclasses.fields(model.config)}
    unknown = sorted(fields - KNOWN_CONFIG_FIELDS)
    if unknown:
        raise UserError(f"The export does not cover the model config field(s) {', '.join(unknown)}: the exported "
                        f"model would compute something else. Teach scripts/export_hf.py and nanochat/hf/ their math")
    unknown = sorted(set(model.state_dict()) - set(expected_parameters(model)))
    if unknown:
        raise UserError(f"The export does not cover the parameter(s) {', '.join(unknown)}. Teach "
                        f"scripts/export_hf.py and nanochat/hf/modeling_nanochat.py what they do")
    if any(right != 0 for _, right in model.window_sizes):
        raise UserError(f"The export covers left attention windows only, got {model.window_sizes}")


def expected_parameters(model):
    """The state-dict keys the exported modeling code defines for this model's config."""
    keys = ["transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas"]
    for i in range(model.config.n_layer):
        keys += [f"transformer.h.{i}.attn.{name}.weight" for name in ("c_q", "c_k", "c_v", "c_proj")]
        keys += [f"transformer.h.{i}.mlp.{name}.weight" for name in ("c_fc", "c_proj")]
    for i in model.value_embeds:
        keys += [f"value_embeds.{i}.weight", f"transformer.h.{i}.attn.ve_gate.weight"]
    if model.config.smear:
        keys += ["smear_gate.weight", "smear_lambda"]
    if model.config.backout:
        keys += ["backout_lambda"]
    return keys


def hf_config(model, tokenizer):
    """config.json: every architecture field, the per-layer facts read off the model, and the auto_map."""
    config = model.config
    return {
        "architectures": ["NanochatForCausalLM"],
        "model_type": "nanochat",
        "auto_map": {"AutoConfig": "configuration_nanochat.NanochatConfig",
                     "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
        "dtype": "float32",
        "vocab_size": config.vocab_size,
        "padded_vocab_size": model.transformer.wte.num_embeddings,
        "sequence_len": config.sequence_len,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_kv_head": config.n_kv_head,
        "n_embd": config.n_embd,
        "window_pattern": config.window_pattern,
        "short_window": config.short_window,
        "window_sizes": [left if left >= 0 else model.rotary_length for left, _ in model.window_sizes],
        "value_embed_layers": sorted(int(i) for i in model.value_embeds),
        "ve_gate_channels": config.ve_gate_channels,
        "ve_gate_scale": config.ve_gate_scale,
        "rotary_base": config.rotary_base,
        "rotary_length": model.rotary_length,
        "qk_scale": config.qk_scale,
        "logit_softcap": LOGIT_SOFTCAP,
        "smear": config.smear,
        "smear_gate_channels": SMEAR_CHANNELS,
        "backout": config.backout,
        "backout_layer": config.n_layer // 2,
        "bos_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        "tie_word_embeddings": False,
        "use_cache": True,
    }


def bytes_to_unicode():
    """The byte-level BPE alphabet: each byte as a printable character (printable ASCII/Latin-1 map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_json(tokenizer):
    """
    Our tiktoken encoding as a `tokenizers` byte-level BPE. tiktoken merges, again and again, the adjacent pair
    whose concatenation has the lowest rank; listing every (left, right) split of every token (both halves
    tokens too) ordered by the rank of the whole gives BPE the same choices. A piece that is a token as a whole
    is taken as is (ignore_merges), as tiktoken does. The special tokens keep their ids.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    enc = tokenizer.enc
    special_ids = {name: tokenizer.encode_special(name) for name in CONTROL_TOKENS}
    if set(tokenizer.get_special_tokens()) != set(CONTROL_TOKENS):
        raise UserError("The export covers nanochat's own tokenizer (scripts.tok_train) only, not this encoding")
    byte_char = bytes_to_unicode()
    vocab = {}
    for token_id in range(tokenizer.get_vocab_size()):
        if token_id not in special_ids.values():
            vocab["".join(byte_char[b] for b in enc.decode_single_token_bytes(token_id))] = token_id
    merges = []
    for token, rank in vocab.items():
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges], ignore_merges=True)
    hf = Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    # tokenizer(text) starts with <|bos|>, as every document did in training; chat templates add their own
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", special_ids["<|bos|>"])])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in CONTROL_TOKENS])
    added = {name: hf.token_to_id(name) for name in CONTROL_TOKENS}
    assert added == special_ids, f"special token ids moved: {added} vs {special_ids}"
    return hf.to_str()


def tokenizer_config(sequence_len):
    with open(os.path.join(HF_CODE_DIR, "chat_template.jinja"), encoding="utf-8") as f:
        chat_template = f.read()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        # Batches need a pad token (pipelines refuse to batch without one); the attention mask hides it, so any id
        # works. The eos one, because generate() then never guesses a mask from pad ids, which would hide a
        # prompt's <|bos|>. Left padding: a batch's new tokens follow every prompt directly.
        "pad_token": "<|assistant_end|>",
        "padding_side": "left",
        "model_max_length": sequence_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def export(model, tokenizer, saved_config, out_dir):
    """Write the export of (model, tokenizer) to out_dir: built in a temp folder beside it, renamed at the end."""
    from safetensors.torch import save_file
    check_architecture(model, saved_config)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir} already exists and is not empty: pick another --out or remove it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
    try:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(model, tokenizer)
        generation = {"bos_token_id": config["bos_token_id"],
                      "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()],
                      "pad_token_id": tokenizer.encode_special("<|assistant_end|>")}
        files = {"config.json": config, "generation_config.json": generation,
                 "tokenizer_config.json": tokenizer_config(model.config.sequence_len)}
        for name, content in files.items():
            with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer_json(tokenizer))
        for name in CODE_FILES:
            shutil.copy(os.path.join(HF_CODE_DIR, name), tmp_dir)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a nanochat checkpoint as a Hugging Face transformers model")
    add_checkpoint_flags(parser, "sft", sorted(STAGE_DIRS))
    parser.add_argument("--out", type=str, required=True, help="the folder to write (must not exist, or be empty)")
    args = parser.parse_args(argv)

    try:
        import safetensors, tokenizers, transformers  # noqa: F401  (the export's files need them to load)
    except ImportError as e:
        raise UserError(f"The export needs the [hf] extra ({e.name} is missing): pip install -e '.[hf]'") from e
    os.environ["NANOCHAT_DTYPE"] = "float32"  # checkpoints are fp32 on disk: keep every weight exactly
    compute_init("cpu")
    _, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = load_model(args.source, "cpu", "eval", model_tag, step)
    export(model, tokenizer, meta["model_config"], args.out)
    print(f"Exported the {args.source} model {model_tag} (step {step}) to {args.out} (fp32 safetensors). Load it "
          f"with AutoModelForCausalLM.from_pretrained({args.out!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
