"""The PyTorch model against transformers, export against run.py and transformers, and the
training loop: exact resume after SIGKILL, 2 processes = 1 process, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from twofile import data, export, run, tokenizer, train
from twofile.model import Llama, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def hf_copy(model: Llama):
    """The same weights in transformers' LlamaForCausalLM (the oracle): a name map only,
    since both rotate the halves of each head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_ff,
                                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                      num_key_value_heads=c.n_head_kv, max_position_embeddings=c.context,
                                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                                      tie_word_embeddings=c.tie_embeddings)).eval()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.attn_q": "self_attn.q_proj",
             "attn.attn_k": "self_attn.k_proj", "attn.attn_v": "self_attn.v_proj", "attn.attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for name, p in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            state[f"model.layers.{i}.{parts[rest.rsplit('.', 1)[0]]}.weight"] = p
        else:
            state[names[name]] = p
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_model_matches_transformers(tie):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, context=32,
                              tie_embeddings=tie)).eval()
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        ours, theirs = model(ids), hf_copy(model)(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_from_depth_fits_every_export_type():
    for depth in (2, 4, 6, 8, 12):
        c = ModelConfig.from_depth(depth, 4096, 256)
        assert c.n_embd % 32 == 0 and c.n_ff % 32 == 0 and c.n_head % c.n_head_kv == 0 and c.head_dim == 64


# --- a tiny prepared corpus and training runs --------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import SAMPLE_TEXT, varied_strings

    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(SAMPLE_TEXT + "\n".join(varied_strings(60, seed=i)))
    tok = tokenizer.train([SAMPLE_TEXT] * 3 + varied_strings(300, seed=9), 400, show_progress=False)
    tokenizer.save(tok, root / "tok.json")
    data.prepare([str(corpus)], str(root / "tok.json"), str(root / "data"), val_fraction=0.2, progress=False)
    return root / "data"


def tiny_config(data_dir, out, **kw) -> train.TrainConfig:
    base = dict(data=str(data_dir), out=str(out), depth=2, context=32, batch_tokens=512, micro_batch=8,
                max_steps=20, warmup_steps=4, lr=3e-3, eval_every=10, checkpoint_every=5, keep_checkpoints=50, seed=3)
    return train.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = train.train(tiny_config(tiny_data, out), progress=False)
    return out, result


def test_training_learns_and_logs(trained_run):
    out, result = trained_run
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    assert [r["step"] for r in records if "val_bpb" in r] == [10, 20]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "tokenizer.json").exists()
    assert [p.name for p in train.checkpoints(out)][-1] == "ckpt_0000020"
    assert 0 < result["val_bpb"] < 20 and result["mfu"] > 0


def test_time_budget_sets_the_step_count(tiny_data, tmp_path):
    t = time.perf_counter()
    result = train.train(tiny_config(tiny_data, tmp_path / "t", max_steps=0, time_budget=6.0, warmup_steps=10),
                         progress=False)
    elapsed = time.perf_counter() - t
    state = json.loads((train.checkpoints(tmp_path / "t")[-1] / "state.json").read_text())
    assert result["step"] == state["total_steps"] > 7
    assert 3 < elapsed < 15, elapsed  # the budget is wall time, evaluation included


def test_export_f32_matches_pytorch_and_transformers(trained_run, tmp_path):
    out, _ = trained_run
    path = export.export(out, tmp_path / "m.gguf", "f32")
    state, weights, _ = train.load_checkpoint(train.checkpoints(out)[-1])
    model = Llama(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights)
    model.eval()
    ours = run.load(path)
    ids = ours.tokenize("The quick brown fox jumps over 12 lazy dogs.")[:32]  # the context is 32
    with torch.no_grad():
        expected = model(torch.tensor([ids])).numpy()[0]
    assert np.abs(ours.logits(ids) - expected).max() <= 1e-4
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - torch.from_numpy(expected)).abs().max() <= 1e-4
    # the file carries the tokenizer and the chat template
    assert ours.tokenizer.encode("hi <|im_end|>", add_bos=False)[-1] == 3
    assert "<|im_start|>assistant" in ours.chat_prompt([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("ftype", ["f16", "bf16", "q8_0", "q4_0", "q4_k"])
def test_quantized_exports(trained_run, tmp_path, ftype):
    out, _ = trained_run
    ref = run.load(export.export(out, tmp_path / "f32.gguf", "f32"))
    q = run.load(export.export(out, tmp_path / f"{ftype}.gguf", ftype))
    ids = ref.tokenize("The quick brown fox jumps over the lazy dog. It's 2024!")[:32]
    a, b = ref.logits(ids), q.logits(ids)
    agreement = (a.argmax(-1) == b.argmax(-1)).mean()
    assert agreement >= {"f16": 1.0, "bf16": 0.9, "q8_0": 0.95}.get(ftype, 0.6), agreement


def test_q4_k_quantizer_against_gguf_reference_decoder():
    import gguf

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 1, (16, 1))).astype(np.float32)
    w[3] = 0.0
    raw = export.quantize_q4_k(w)
    assert raw.shape == (16, 2 * 144)
    decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    step = (w.reshape(16, -1, 32).max(-1) - np.minimum(w.reshape(16, -1, 32).min(-1), 0)) / 15
    err = np.abs(decoded - w).reshape(16, -1, 32).max(-1)
    assert (err <= 0.75 * step + 1e-6 + 0.02 * np.abs(w).reshape(16, -1, 32).max(-1)).all()
    assert np.array_equal(run.dequantize(raw, int(gguf.GGMLQuantizationType.Q4_K)), decoded)


def test_eval_gguf_matches_pytorch_bits_per_byte(trained_run, tmp_path):
    out, _ = trained_run
    path = export.export(out, tmp_path / "m.gguf", "f32")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    r = export.evaluate_text(run.load(path), text)
    state, weights, _ = train.load_checkpoint(train.checkpoints(out)[-1])
    model = Llama(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights)
    ids = tokenizer.load(out / "tokenizer.json").encode(text, add_special_tokens=False).ids
    ids = [0] + ids
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 32):
            w = torch.tensor([ids[s:s + 33]])
            nats += model(w[:, :-1], w[:, 1:], reduction="sum")[1].item()
    assert r["bits_per_byte"] == pytest.approx(nats / len(text.encode()) / np.log(2), rel=1e-4)


# --- resume, processes, bad input (subprocesses) ------------------------------------------

TRAIN_SCRIPT = """
import sys, json
sys.path.insert(0, {root!r})
from twofile import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.train(cfg, resume=sys.argv[2] == "resume", progress=False)
"""


def run_training(cfg: train.TrainConfig, resume=False, nproc=1, wait=True):
    code = TRAIN_SCRIPT.format(root=str(ROOT))
    args = [json.dumps(cfg.__dict__), "resume" if resume else "new"]
    if nproc > 1:
        script = Path(cfg.out).parent / "train_script.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(script), *args]
    else:
        cmd = [sys.executable, "-c", code, *args]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    return stderr


def final_weights(out) -> dict:
    return train.load_checkpoint(train.checkpoints(Path(out))[-1])[1]


def test_sigkill_then_resume_is_bit_exact(tiny_data, tmp_path):
    straight = tiny_config(tiny_data, tmp_path / "straight")
    run_training(straight)
    killed = tiny_config(tiny_data, tmp_path / "killed")
    p = run_training(killed, wait=False)
    deadline = time.time() + 300
    while not any(c.name >= "ckpt_0000010" for c in train.checkpoints(Path(killed.out))):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert train.checkpoints(Path(killed.out))[-1].name < "ckpt_0000020"  # it really stopped early
    run_training(killed, resume=True)
    a, b = final_weights(straight.out), final_weights(killed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer,tolerance", [("adamw", 1e-5), ("muon", 2e-4)])
def test_two_processes_equal_one(tiny_data, tmp_path, optimizer, tolerance):
    """DDP over 2 CPU processes (gloo) against 1 process with the same global batch. Muon's
    Newton-Schulz iterations amplify the float32 differences of summing gradients in
    another order, hence its looser tolerance."""
    one = tiny_config(tiny_data, tmp_path / "one", optimizer=optimizer)   # 2 accumulation steps
    two = tiny_config(tiny_data, tmp_path / "two", optimizer=optimizer)   # 2 ranks x 1
    run_training(one)
    run_training(two, nproc=2)

    def losses(out):
        return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(l)]

    assert len(losses(one.out)) == 20
    np.testing.assert_allclose(losses(two.out), losses(one.out), atol=tolerance, rtol=0)
    # a 2-process run resumes too: drop its last checkpoints and continue to the same end
    for ckpt in train.checkpoints(Path(two.out))[-2:]:
        import shutil
        shutil.rmtree(ckpt)
    run_training(two, resume=True, nproc=2)
    np.testing.assert_allclose(losses(two.out), losses(one.out), atol=tolerance, rtol=0)


def test_bad_input(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError):
        train.train(tiny_config(tmp_path / "missing", tmp_path / "o"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json"):
        train.train(tiny_config(tmp_path / "empty", tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="not a multiple of micro_batch"):
        train.train(tiny_config(tiny_data, tmp_path / "o", batch_tokens=100), progress=False)
    cfg = tiny_config(tiny_data, tmp_path / "o", max_steps=5)
    train.train(cfg, progress=False)
    with pytest.raises(ValueError, match="holds checkpoints"):
        train.train(cfg, progress=False)
    with pytest.raises(ValueError, match="was trained with depth = 2, not 3"):
        train.train(tiny_config(tiny_data, tmp_path / "o", max_steps=5, depth=3), resume=True, progress=False)
    with pytest.raises(ValueError, match="diverged"):
        train.train(tiny_config(tiny_data, tmp_path / "nan", lr=1e12, grad_clip=0), progress=False)
    assert all(np.isfinite(v.numpy()).all() for v in final_weights(tmp_path / "nan").values()) \
        if train.checkpoints(tmp_path / "nan") else True


def test_disk_full_during_checkpoint_keeps_the_last_good_one(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "o"
    train.train(tiny_config(tiny_data, out, max_steps=5), progress=False)
    good = train.checkpoints(out)[-1]
    import safetensors.torch

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    state, weights, _ = train.load_checkpoint(good)
    model = Llama(ModelConfig(**state["model_config"]))
    with pytest.raises(OSError, match="No space left"):
        gathered = train.gather_state(model, [torch.optim.AdamW(model.parameters())])
        train.save_checkpoint(out, *gathered, {**state, "step": 6}, keep=2)
    assert train.checkpoints(out)[-1] == good and not list(out.glob(".tmp_*"))
    assert train.load_checkpoint(good)[0]["step"] == 5


def test_ctrl_c_saves_and_resumes(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "c", max_steps=400, checkpoint_every=1000, eval_every=1000)
    p = run_training(cfg, wait=False)
    deadline = time.time() + 120
    while not (Path(cfg.out) / "metrics.jsonl").exists() or \
            len((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()) < 5:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0 and "checkpoint saved" in stderr
    saved = train.checkpoints(Path(cfg.out))
    assert len(saved) == 1 and 0 < json.loads((saved[0] / "state.json").read_text())["step"] < 400


def test_fsdp2_two_processes_equal_one(tiny_data, tmp_path):
    """FSDP2 (fully_shard) over 2 CPU processes: the same losses as 1 process, and a resume
    from its gathered checkpoint reaches the same end."""
    one = tiny_config(tiny_data, tmp_path / "one", max_steps=10, optimizer="adamw")
    sharded = tiny_config(tiny_data, tmp_path / "fsdp", max_steps=10, fsdp=True, optimizer="adamw")
    run_training(one)
    run_training(sharded, nproc=2)

    def losses(out):
        return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(l)]

    np.testing.assert_allclose(losses(sharded.out), losses(one.out), atol=1e-5, rtol=0)
    import shutil

    shutil.rmtree(train.checkpoints(Path(sharded.out))[-1])  # back to step 5
    run_training(sharded, resume=True, nproc=2)
    np.testing.assert_allclose(losses(sharded.out), losses(one.out), atol=1e-5, rtol=0)
    a, b = final_weights(one.out), final_weights(sharded.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
