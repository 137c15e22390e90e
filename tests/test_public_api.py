"""
The names nanochat's users import, pinned: notebooks, scripts and tools written against nanochat call these with
these arguments and unpack these results. A failure here means a change would break them: keep the established
parameters (names, order, defaults) and add new ones only as keywords with defaults after them.
"""
import dataclasses
import inspect
import sys

import pytest
import torch

from nanochat import checkpoint_manager, common, engine, gpt, kv_cache, loss_eval, tokenizer
from tasks import arc, common as task_common, customjson, gsm8k, humaneval, mmlu, smoltalk, spellingbee

EMPTY = inspect.Parameter.empty

# callable -> its established leading parameters, as (name, default) with EMPTY for "no default"
ESTABLISHED = {
    gpt.GPT.__init__: [("self", EMPTY), ("config", EMPTY)],
    gpt.GPT.forward: [("self", EMPTY), ("idx", EMPTY), ("targets", None), ("kv_cache", None), ("loss_reduction", "mean")],
    gpt.GPT.generate: [("self", EMPTY), ("tokens", EMPTY), ("max_tokens", EMPTY), ("temperature", 1.0), ("top_k", None),
                       ("seed", 42)],
    gpt.GPT.setup_optimizer: [("self", EMPTY), ("unembedding_lr", 0.008), ("embedding_lr", 0.3), ("matrix_lr", 0.02),
                              ("weight_decay", 0.0), ("adam_betas", None), ("scalar_lr", 0.5)],
    gpt.GPT.estimate_flops: [("self", EMPTY)],
    gpt.GPT.num_scaling_params: [("self", EMPTY)],
    gpt.GPT.get_device: [("self", EMPTY)],
    engine.Engine.__init__: [("self", EMPTY), ("model", EMPTY), ("tokenizer", EMPTY)],
    engine.Engine.generate: [("self", EMPTY), ("tokens", EMPTY), ("num_samples", 1), ("max_tokens", None),
                             ("temperature", 1.0), ("top_k", None), ("seed", 42)],
    engine.Engine.generate_batch: [("self", EMPTY), ("tokens", EMPTY), ("num_samples", 1)],
    kv_cache.KVCache.__init__: [("self", EMPTY), ("batch_size", EMPTY), ("num_heads", EMPTY), ("seq_len", EMPTY),
                                ("head_dim", EMPTY), ("num_layers", EMPTY), ("device", EMPTY), ("dtype", EMPTY)],
    kv_cache.KVCache.reset: [("self", EMPTY)],
    kv_cache.KVCache.get_pos: [("self", EMPTY)],
    kv_cache.KVCache.get_layer_cache: [("self", EMPTY), ("layer_idx", EMPTY)],
    kv_cache.KVCache.advance: [("self", EMPTY), ("num_tokens", EMPTY)],
    kv_cache.KVCache.prefill: [("self", EMPTY), ("other", EMPTY)],
    checkpoint_manager.load_model: [("source", EMPTY), ("device", EMPTY), ("phase", EMPTY), ("model_tag", None),
                                    ("step", None)],
    checkpoint_manager.load_model_from_dir: [("checkpoints_dir", EMPTY), ("device", EMPTY), ("phase", EMPTY),
                                             ("model_tag", None), ("step", None)],
    checkpoint_manager.save_checkpoint: [("checkpoint_dir", EMPTY), ("step", EMPTY), ("model_data", EMPTY),
                                         ("optimizer_data", EMPTY), ("meta_data", EMPTY), ("rank", 0)],
    checkpoint_manager.load_checkpoint: [("checkpoint_dir", EMPTY), ("step", EMPTY), ("device", EMPTY),
                                         ("load_optimizer", False), ("rank", 0)],
    checkpoint_manager.build_model: [("checkpoint_dir", EMPTY), ("step", EMPTY), ("device", EMPTY), ("phase", EMPTY)],
    tokenizer.get_tokenizer: [],
    tokenizer.get_token_bytes: [("device", "cpu")],
    tokenizer.RustBPETokenizer.encode: [("self", EMPTY), ("text", EMPTY), ("prepend", None), ("append", None),
                                        ("num_threads", 8)],
    tokenizer.RustBPETokenizer.decode: [("self", EMPTY), ("ids", EMPTY)],
    tokenizer.RustBPETokenizer.render_conversation: [("self", EMPTY), ("conversation", EMPTY), ("max_tokens", 2048)],
    tokenizer.RustBPETokenizer.render_for_completion: [("self", EMPTY), ("conversation", EMPTY)],
    tokenizer.RustBPETokenizer.train_from_iterator: [("text_iterator", EMPTY), ("vocab_size", EMPTY)],
    tokenizer.RustBPETokenizer.from_directory: [("tokenizer_dir", EMPTY)],
    loss_eval.evaluate_bpb: [("model", EMPTY), ("batches", EMPTY), ("steps", EMPTY), ("token_bytes", EMPTY)],
    common.compute_init: [("device_type", "")],
    common.compute_cleanup: [],
    common.get_base_dir: [],
    task_common.Task.__init__: [("self", EMPTY), ("start", 0), ("stop", None), ("step", 1)],
    task_common.Task.evaluate: [("self", EMPTY), ("conversation", EMPTY), ("assistant_response", EMPTY)],
    task_common.TaskMixture.__init__: [("self", EMPTY), ("tasks", EMPTY)],
    task_common.TaskSequence.__init__: [("self", EMPTY), ("tasks", EMPTY)],
    arc.ARC.__init__: [("self", EMPTY), ("subset", "ARC-Easy"), ("split", "train")],
    mmlu.MMLU.__init__: [("self", EMPTY), ("subset", "all"), ("split", "test")],
    gsm8k.GSM8K.__init__: [("self", EMPTY), ("subset", "main"), ("split", "train")],
    humaneval.HumanEval.__init__: [("self", EMPTY)],
    smoltalk.SmolTalk.__init__: [("self", EMPTY), ("split", "train")],
    spellingbee.SpellingBee.__init__: [("self", EMPTY), ("size", 1000), ("split", "train")],
    customjson.CustomJSON.__init__: [("self", EMPTY), ("filepath", EMPTY)],
}


@pytest.mark.parametrize("function", list(ESTABLISHED), ids=lambda f: f.__qualname__)
def test_established_parameters_come_first_in_order_with_their_defaults(function):
    parameters = list(inspect.signature(function).parameters.values())
    established = ESTABLISHED[function]
    assert [(p.name, p.default) for p in parameters[:len(established)]] == established
    for extra in parameters[len(established):]:  # anything added since is optional, so old calls still work
        assert extra.default is not EMPTY or extra.kind in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD), extra.name


def test_gpt_config_keeps_its_established_fields_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(gpt.GPTConfig)}
    established = {"sequence_len": 2048, "vocab_size": 32768, "n_layer": 12, "n_head": 6, "n_kv_head": 6,
                   "n_embd": 768, "window_pattern": "SSSL"}
    assert list(fields)[:len(established)] == list(established)
    assert {k: fields[k] for k in established} == established
    # the 2026 fields default to the January architecture, so a config saved before them means that model
    assert gpt.GPTConfig(**established) == gpt.GPTConfig()


def test_return_shapes(tmp_path, monkeypatch):
    """load_model -> (model, tokenizer, meta_data); compute_init -> 5 values; the Engine's streams and batches."""
    from helpers import tiny_gpt
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # compute_init installs its one-line error printer
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    ddp, rank, local_rank, world_size, device = common.compute_init("cpu")
    assert (ddp, rank, local_rank, world_size, device.type) == (False, 0, 0, 1, "cpu")

    class Tok:  # the tokenizer contract of the Engine
        def encode_special(self, name):
            return {"<|bos|>": 0, "<|assistant_end|>": 1}.get(name, 2)

        def get_bos_token_id(self):
            return 0

        def encode(self, text, prepend=None):
            return [3, 4]

        def decode(self, ids):
            return ""

    model = tiny_gpt(vocab_size=64)
    eng = engine.Engine(model, Tok())
    token_column, token_masks = next(eng.generate([0, 5, 6], num_samples=2, max_tokens=3, temperature=0.0))
    assert len(token_column) == len(token_masks) == 2
    results, masks = eng.generate_batch([0, 5, 6], num_samples=2, max_tokens=3, temperature=0.0)
    assert len(results) == len(masks) == 2 and results[0][:3] == [0, 5, 6]

    cache = kv_cache.KVCache(1, 1, 8, 32, 2, "cpu", torch.float32)  # the seven established arguments
    assert cache.k_cache.shape == (2, 1, 8, 1, 32) and cache.cache_seqlens.dtype == torch.int32
