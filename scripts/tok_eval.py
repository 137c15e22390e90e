"""
Compression of the trained tokenizer (UTF-8 bytes per token, higher is better) on several kinds of
text, next to GPT-2's and GPT-4's tokenizers where they can be loaded.

python -m scripts.tok_eval
"""

import textwrap

from nanochat.common import report_user_errors
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

report_user_errors()  # a missing or damaged tokenizer or shard is one line naming it

MATH_TEXT = r"""
\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space, $|\langle u, v \rangle|^2 \le \langle u, u \rangle \cdot \langle v, v \rangle$.
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \frac{\langle u, v \rangle}{\langle v, v \rangle}$; then
$0 \le \| u - \lambda v \|^2 = \langle u, u \rangle - \frac{|\langle u, v \rangle|^2}{\langle v, v \rangle}$.
\end{proof}
The Gaussian integral: $\int_{-\infty}^{\infty} e^{-x^2}\, dx = \sqrt{\pi}$, and
$\sum_{n=1}^{\infty} \frac{1}{n^2} = \frac{\pi^2}{6} \approx 1.6449340668$.
Solve $3x^2 - 12x + 9 = 0$: $x = \frac{12 \pm \sqrt{144 - 108}}{6}$, so $x \in \{1, 3\}$.
"""

NON_ENGLISH_TEXT = """
안녕하세요. 오늘은 날씨가 정말 좋네요. 우리는 공원에서 산책을 하고 커피를 마셨습니다.
이 모델은 작은 데이터로 학습되었기 때문에 한국어를 잘 이해하지 못할 수도 있습니다.
Guten Morgen! Die Straßenbahn fährt heute wegen Bauarbeiten nur bis zum Hauptbahnhof.
Ich möchte gerne zwei Brötchen und eine Tasse Kaffee, bitte. Übermorgen beginnt das Schuljahr.
"""


def first_batch_text(split):
    return "\n".join(next(iter(parquets_iter_batched(split=split))))


def python_source():
    """A real Python module from the standard library (textwrap: ~20 KB of code and docstrings)."""
    with open(textwrap.__file__, encoding="utf-8") as f:
        return f.read()


def web_document(min_chars=4000):
    """The first validation document long enough to be typical of the web text (Wikipedia here)."""
    docs = next(iter(parquets_iter_batched(split="val")))
    return next((doc for doc in docs if len(doc) >= min_chars), max(docs, key=len))


texts = {
    "web": web_document(),
    "code": python_source(),
    "math": MATH_TEXT,
    "non-english": NON_ENGLISH_TEXT,
    "train-shard": first_batch_text("train"),
    "val-shard": first_batch_text("val"),
}

tokenizers = {"ours": get_tokenizer()}
skipped = {}
for label, tiktoken_name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
    try:
        tokenizers[label] = RustBPETokenizer.from_pretrained(tiktoken_name)
    except RuntimeError as error:
        skipped[label] = str(error)  # offline: tiktoken downloads these, only cl100k_base ships offline
for label, reason in skipped.items():
    print(f"Skipping the {label} comparison: {reason}")


def bytes_per_token(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text, "tokenizer does not round-trip"
    return len(text.encode("utf-8")) / len(ids)


header = ["text", "bytes"] + [f"{label} bytes/token" for label in tokenizers]
rows = []
for kind, text in texts.items():
    ratios = [bytes_per_token(tokenizer, text) for tokenizer in tokenizers.values()]
    rows.append([kind, f"{len(text.encode('utf-8')):,}"] + [f"{ratio:.2f}" for ratio in ratios])

widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
table_lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
print("\n".join(table_lines))

markdown = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header)] + rows)
notes = {"vocab_size": tokenizers["ours"].get_vocab_size()}
notes.update({f"{label} encoding": tokenizer.enc.name for label, tokenizer in tokenizers.items() if label != "ours"})
notes.update({f"{label} skipped": reason for label, reason in skipped.items()})
get_report().log(section="Tokenizer evaluation", data=[notes, markdown])
