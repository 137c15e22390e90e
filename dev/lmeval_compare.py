"""
Our Hugging Face export through a real third-party client: EleutherAI's lm-evaluation-harness (lm-eval) scores
the exported checkpoint on two local tasks built from the embedded data, and each figure is printed next to
ours, our own GPT's evaluation of the same items. lm-eval is not a nanochat dependency:

    pip install 'lm-eval[hf]'    # lm-eval with its transformers backend (0.4.13 was used for dev/LOG.md)
    python -m dev.lmeval_compare -i base [-g TAG] [-s STEP] [--arc-items 100] [--bpb-docs 20]

- arc_easy_local: ARC-Easy test questions (data/chat/arc) with lm-eval's own arc_easy prompt, zero-shot: each
  choice's log-likelihood after "Question: ...\\nAnswer:", then acc and acc_norm (log-likelihood per character).
  Ours: the same log-likelihoods from our tokenizer and our model, the continuation's tokens being the whole
  string's tokens past the context's (lm-eval's split), both after <|bos|> (as every training document starts).
- bpb_local: documents of the embedded sample's val shard, lm-eval's loglikelihood_rolling: windows of the
  model's context (max_position_embeddings = sequence_len), the first after <|bos|>, each later one predicting
  the next tokens from the tokens just before them; bits per byte over the documents' UTF-8 bytes. Ours: the
  same windows through our model. (lm-eval runs it with add_bos_token=False: the exported tokenizer starts every
  text with <|bos|> itself, and the rolling windows put one in front again.)

Both run in fp32 on the same checkpoint (exported to a temp folder with scripts.export_hf), offline.
"""

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

from nanochat.checkpoint_manager import STAGE_DIRS, find_checkpoint, load_model
from nanochat.common import compute_init
from nanochat.dataset import list_parquet_files
from nanochat.datasource import EMBEDDED_DATA_DIR
from nanochat.run import add_checkpoint_flags

ARC_PROMPT = "Question: {question}\nAnswer:"  # lm-eval's arc_easy doc_to_text; choices follow after a space


def arc_items(num_items):
    """The first num_items ARC-Easy test questions, in the ai2_arc layout lm-eval's arc_easy config reads."""
    path = os.path.join(EMBEDDED_DATA_DIR, "chat", "arc", "ARC-Easy-Test.reconstructed.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(num_items))]
    return [{"question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]


def val_documents(num_docs):
    """The first num_docs documents of the embedded sample's val shard (its last)."""
    import pyarrow.parquet as pq
    val_shard = list_parquet_files(os.path.join(EMBEDDED_DATA_DIR, "pretrain"))[-1]
    return [{"text": text} for text in pq.read_table(val_shard, columns=["text"]).column("text").to_pylist()[:num_docs]]


def lm_eval_task(name, data_file, output_type):
    """A task config for lm-eval's TaskManager, reading a local jsonl (the json builder of `datasets`)."""
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
              "test_split": "test", "output_type": output_type}
    if output_type == "multiple_choice":  # lm-eval's arc_easy.yaml
        config.update(doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{choices.label.index(answerKey)}}",
                      doc_to_choice="{{choices.text}}", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    else:
        config.update(doc_to_text="", doc_to_target="text", metric_list=[{"metric": "bits_per_byte"}])
    return config


def run_lm_eval(hf_dir, task, device, batch_size, **model_args):
    """-> (metrics, per-doc log-likelihoods in doc order, lm-eval's max_length)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=hf_dir, trust_remote_code=True, dtype="float32", device=device, batch_size=batch_size,
              **model_args)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True)
    samples = sorted(out["samples"][task["task"]], key=lambda s: s["doc_id"])
    # multiple choice: one (loglikelihood, is_greedy) per choice; rolling: one loglikelihood per document
    lls = [[r[0] if isinstance(r, (tuple, list)) else r for r in s["filtered_resps"]] for s in samples]
    return out["results"][task["task"]], lls, lm.max_length


@torch.no_grad()
def token_logprobs(model, inputs, targets):
    """Summed log-probabilities of targets, the last len(targets) tokens predicted from inputs (one row)."""
    logits = model(torch.tensor([inputs], device=model.get_device()))[0, -len(targets):]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None]).sum().item()


def our_arc(model, tokenizer, items):
    """-> per item the log-likelihood of each choice, acc, acc_norm (as lm-eval defines them)."""
    bos = tokenizer.get_bos_token_id()
    lls, hits, hits_norm = [], [], []
    for item in items:
        context = ARC_PROMPT.format(question=item["question"])
        context_ids = [bos] + tokenizer.encode(context)
        scores = []
        for choice in item["choices"]["text"]:
            whole = [bos] + tokenizer.encode(f"{context} {choice}")
            scores.append(token_logprobs(model, whole[:-1], whole[len(context_ids):]))
        gold = item["choices"]["label"].index(item["answerKey"])
        per_char = [s / len(c) for s, c in zip(scores, item["choices"]["text"])]
        lls.append(scores)
        hits.append(max(range(len(scores)), key=scores.__getitem__) == gold)
        hits_norm.append(max(range(len(scores)), key=per_char.__getitem__) == gold)
    return lls, sum(hits) / len(items), sum(hits_norm) / len(items)


def rolling_windows(tokens, context, bos):
    """
    (inputs, targets) covering every token once: the first window predicts up to `context` tokens after <|bos|>;
    each later one predicts up to `context` more from the `context` tokens just before its last target.
    """
    first = min(context, len(tokens))
    windows = [([bos] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + context, len(tokens))
        windows.append((tokens[end - 1 - context:end - 1], tokens[done:end]))
        done = end
    return windows


def our_bpb(model, tokenizer, docs, context):
    """-> per document the log-likelihood, and bits per byte over all documents."""
    bos = tokenizer.get_bos_token_id()
    lls = [sum(token_logprobs(model, inputs, targets)
               for inputs, targets in rolling_windows(tokenizer.encode(doc["text"]), context, bos)) for doc in docs]
    num_bytes = sum(len(doc["text"].encode("utf-8")) for doc in docs)
    return lls, -sum(lls) / (num_bytes * math.log(2))


def flatten(rows):
    return [x for row in rows for x in (row if isinstance(row, list) else [row])]


def max_difference(ours, theirs):
    """Largest |ours - theirs| over the log-likelihoods (per item: a list of choices, or one per document)."""
    return max(abs(a - b) for a, b in zip(flatten(ours), flatten(theirs), strict=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(parser, "base", sorted(STAGE_DIRS))
    parser.add_argument("--arc-items", type=int, default=100, help="ARC-Easy test questions (first N)")
    parser.add_argument("--bpb-docs", type=int, default=20, help="val documents for bits per byte (first N)")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    parser.add_argument("--device-type", type=str, default="cpu", help="cpu|cuda (both sides run in fp32)")
    args = parser.parse_args()

    # offline: lm-eval's datasets and transformers must not look for anything on the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (the [hf] extra: accelerate)
    except ImportError as e:
        print(f"Skipped: lm-eval with its transformers backend is not installed ({e.name} is missing; it is no "
              f"nanochat dependency): pip install 'lm-eval[hf]', then run this again")
        return
    os.environ["NANOCHAT_DTYPE"] = "float32"
    device = compute_init(args.device_type)[-1]
    _, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = load_model(args.source, device, "eval", model_tag, step)
    print(f"lm-eval {lm_eval.__version__} vs ours: the {args.source} model {model_tag} step {step}, fp32, "
          f"{args.device_type}; context {model.config.sequence_len} tokens")

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        export = subprocess.run([sys.executable, "-m", "scripts.export_hf", "-i", args.source, "-g", model_tag,
                                 "-s", str(step), "--out", hf_dir], stdout=subprocess.DEVNULL)
        if export.returncode != 0:
            sys.exit("The export failed (its error is above)")
        items, docs = arc_items(args.arc_items), val_documents(args.bpb_docs)
        for name, rows in [("arc.jsonl", items), ("docs.jsonl", docs)]:
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        arc_task = lm_eval_task("arc_easy_local", os.path.join(tmp, "arc.jsonl"), "multiple_choice")
        bpb_task = lm_eval_task("bpb_local", os.path.join(tmp, "docs.jsonl"), "loglikelihood_rolling")
        arc_metrics, arc_lls, _ = run_lm_eval(hf_dir, arc_task, args.device_type, args.batch_size)
        bpb_metrics, bpb_lls, max_length = run_lm_eval(hf_dir, bpb_task, args.device_type, args.batch_size,
                                                       add_bos_token=False)

    our_arc_lls, acc, acc_norm = our_arc(model, tokenizer, items)
    our_doc_lls, bpb = our_bpb(model, tokenizer, docs, model.config.sequence_len)
    print(f"lm-eval's context (max_length): {max_length} tokens; ours: {model.config.sequence_len}")
    print(f"{'task':<16}{'items':>6}  {'figure':<26}{'lm-eval':>12}{'ours':>12}")
    rows = [("arc_easy_local", len(items), "acc", arc_metrics["acc,none"], acc),
            ("", "", "acc_norm", arc_metrics["acc_norm,none"], acc_norm),
            ("", "", "max |log-lik diff| choice", max_difference(our_arc_lls, arc_lls), None),
            ("", "", "max |log-lik| choice", None, max(-ll for lls in our_arc_lls for ll in lls)),
            ("bpb_local", len(docs), "bits_per_byte", bpb_metrics["bits_per_byte,none"], bpb),
            ("", "", "max |log-lik diff| doc", max_difference(our_doc_lls, bpb_lls), None),
            ("", "", "max |log-lik| doc", None, max(-ll for ll in our_doc_lls))]
    for task, n, figure, theirs, ours in rows:
        theirs = "" if theirs is None else f"{theirs:12.2e}" if "diff" in figure else f"{theirs:12.7f}"
        ours = "" if ours is None else f"{ours:12.7f}" if figure in ("acc", "acc_norm", "bits_per_byte") else f"{ours:12.1f}"
        print(f"{task:<16}{n!s:>6}  {figure:<26}{theirs:>12}{ours:>12}")
    print(f"bits per byte |lm-eval - ours| = {abs(bpb_metrics['bits_per_byte,none'] - bpb):.1e}")


if __name__ == "__main__":
    main()
