"""Tensor parallelism (catsgen/parallel.py) on the CPU over gloo: the sharded model's logits and
greedy tokens equal the single-process model's, dense and with CATS thresholds (per layer and per
neuron), on small random Llama and Mistral checkpoints; torchrun runs the CLI on the real SmolLM2
(3 ranks) and refuses 2 ranks with one error line; a failing or dying rank stops every rank."""

import json
import multiprocessing
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from catsgen.bench import weight_bytes_per_token
from catsgen.calibrate import ActivationSample, recording
from catsgen.checkpoint import load_model
from catsgen.config import ModelConfig, preset
from catsgen.errors import UserError
from catsgen.parallel import ShardPlan
from conftest import ROOT, VOCAB
from helpers_cats import calibrate_quietly, run_main
from helpers_gguf import smollm2_converted, smollm2_gguf  # noqa: F401  (session fixtures)
from helpers_parallel import measure, worker

# GQA, MHA, tied embeddings, a sliding window shorter than the prompt, a multi-file checkpoint.
CASES = ("gqa", "mha", "tied_gqa", "mistral_window", "sharded")
PROMPT_LEN = 12
TIMEOUT_S = 240  # spawning 2 ranks (torch imports) on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def thresholds_for(model, prompt) -> dict:
    """Dense; per layer, the median |SiLU(gate)| on the prompt (about half the neurons off);
    per neuron, that median scaled by a random factor in [0, 2) for each neuron."""
    c = model.config
    sample = ActivationSample(c.n_layers, PROMPT_LEN * c.intermediate_size)
    with recording(model, sample):
        model(torch.tensor([prompt]))
    per_layer = [row[50] for row in sample.thresholds()]
    g = torch.Generator().manual_seed(3)
    per_neuron = [t * 2 * torch.rand(c.intermediate_size, generator=g) for t in per_layer]
    return {"dense": None, "per_layer": per_layer, "per_neuron": per_neuron}


def test_sharded_equals_single_process(checkpoints, tmp_path):
    cases, reference = {}, {}
    for i, name in enumerate(CASES):
        directory = checkpoints[name][0]
        prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(i)).tolist()
        model = load_model(directory, dtype=torch.float32)
        thresholds = thresholds_for(model, prompt)
        cases[name] = (str(directory), prompt, thresholds)
        reference[name] = measure(model, prompt, thresholds)
    out = tmp_path / "rank0.pt"
    codes = spawn_ranks(2, cases, out)
    sharded = torch.load(out)
    for name in CASES:
        dense_logits = reference[name]["dense"][0]
        for label, (logits, tokens, sparsity) in reference[name].items():
            got_logits, got_tokens, got_sparsity = sharded[name][label]
            assert torch.allclose(got_logits, logits, rtol=1e-4, atol=1e-4), (name, label)
            assert got_tokens == tokens, (name, label)
            assert got_sparsity == (sparsity and pytest.approx(sparsity, abs=1e-9)), (name, label)  # all ranks
            if label != "dense":  # CATS really changed the model, so a wrong slice would show
                assert not torch.allclose(logits, dense_logits, atol=1e-3), (name, label)
    assert sharded["agree_error"] == "rank 1: only here"
    assert codes == [4, 3]  # rank 1 died; rank 0's next all-reduce failed instead of hanging


def spawn_ranks(world, cases, out) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, cases, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(p.is_alive() for p in procs)
    return [p.exitcode for p in procs]


def test_plan_refuses_a_world_that_does_not_divide_the_kv_heads():
    smollm2_like = ModelConfig(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, intermediate_size=1536, vocab_size=8)
    with pytest.raises(UserError, match=r"cannot shard over 2 ranks.*\(ranks that work: 1, 3\)"):
        ShardPlan.make(smollm2_like, 0, 2)
    assert ShardPlan.make(smollm2_like, 2, 3).split("mlp.down_proj.weight") == (1, 1024, 1536)


def test_llama_2_70b_preset_shards_over_8():
    c = preset("llama-2-70b")
    plan = ShardPlan.make(c, 7, 8)
    assert (c.n_layers, plan.n_heads, plan.n_kv_heads, plan.neurons) == (80, 8, 1, 3584)


def torchrun(n, *args):
    """torchrun on n CPU ranks: `torchrun --nproc-per-node n ARGS` (a script, or -m module)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--master-port", str(free_port()), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_torchrun_generate_on_smollm2(smollm2_converted, capsys):  # noqa: F811
    args = ("--checkpoint", smollm2_converted, "--prompt", "The capital of France is",
            "--max-new-tokens", 10, "--device", "cpu", "--dtype", "float32", "--max-seq-len", 64)
    code, single, _ = run_main(capsys, "generate", *args)
    assert code == 0 and len(single.split()) > 3
    three = torchrun(3, "generate.py", *args)
    assert three.returncode == 0, three.stderr
    assert three.stdout == single  # rank 0 alone streams, and the same tokens
    assert three.stderr.count(" tok/s; ") == 1  # one summary line
    two = torchrun(2, "generate.py", *args)
    assert two.returncode != 0
    errors = [line for line in two.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot shard over 2 ranks: num_key_value_heads (3) and intermediate_size (1536) "
                      "must both be divisible by it (ranks that work: 1, 3)"]


def test_torchrun_perplexity_equals_one_process(checkpoints, tmp_path, capsys):
    thresholds = tmp_path / "thresholds.json"
    calibrate_quietly(checkpoints["gqa"][0], thresholds, tokens=256, seq_len=64)
    args = ("perplexity", "--checkpoint", checkpoints["gqa"][0], "--max-tokens", 200, "--seq-len", 50,
            "--device", "cpu", "--sparsity", 0, 0.5, "--thresholds", thresholds, "--json")
    code, single, _ = run_main(capsys, *args)
    assert code == 0
    two = torchrun(2, "-m", "catsgen.cli", *args)
    assert two.returncode == 0, two.stderr
    ours, theirs = json.loads(two.stdout)["rows"], json.loads(single)["rows"]  # one JSON: rank 0's
    assert [r["perplexity"] for r in ours] == pytest.approx([r["perplexity"] for r in theirs], rel=1e-5)
    # The measured sparsity counts every rank's neurons (> 0.4: the thresholds zero about half).
    assert [r["actual_sparsity"] for r in ours] == [r["actual_sparsity"] for r in theirs]
    assert ours[1]["actual_sparsity"] > 0.4
    assert two.stderr.count("sparsity 0.50 uniform") == 1  # rank 0 alone draws the progress


def test_torchrun_bench_reports_the_all_reduce(tmp_path):
    out = tmp_path / "bench.json"
    run = torchrun(2, "bench.py", "--preset", "tiny", "--device", "cpu", "--new-tokens", 4, "--repeats", 1,
                   "--prompt-len", 8, "--sparsity", 0, 0.5, "--json", out)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["tensor_parallel"]["ranks"] == 2 and report["tensor_parallel"]["all_reduce_us"] > 0
    assert all(0 < row["all_reduce_share"] for row in report["rows"])
    # Per GPU: half of every layer's matrices, the whole (replicated) embedding row and LM head.
    tiny = preset("tiny")
    per_gpu = weight_bytes_per_token(tiny, 4, 1.0, plan=ShardPlan.make(tiny, 0, 2))
    assert report["rows"][0]["weight_bytes_per_token"] == per_gpu
    assert run.stdout.count("tensor parallel over 2 ranks") == 1


def test_a_rank_loads_its_slices_of_every_split_tensor(checkpoints):
    # Loading needs no process group: rank 1 of 2 read alone, against the whole model's slices.
    directory = checkpoints["gqa"][0]
    whole = load_model(directory, dtype=torch.float32)
    plan = ShardPlan.make(whole.config, 1, 2)
    part = load_model(directory, dtype=torch.float32, plan=plan)
    hd, c = plan.head_dim, whole.config
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    for mine, theirs in zip(part.layers, whole.layers):
        wqkv = theirs.attention.wqkv.weight
        q_rows, k_rows, v_rows = wqkv[q // 2:q], wqkv[q + kv // 2:q + kv], wqkv[q + kv + kv // 2:]
        assert torch.equal(mine.attention.wqkv.weight, torch.cat([q_rows, k_rows, v_rows]))
        assert torch.equal(mine.attention.wo.weight, theirs.attention.wo.weight[:, q // 2:])
        f = c.intermediate_size // 2
        for name in ("w_gate", "w_up", "w_down_t"):
            assert torch.equal(getattr(mine.feed_forward, name), getattr(theirs.feed_forward, name)[f:])
    assert torch.equal(part.output.weight, whole.output.weight)  # replicated


def test_a_split_tensor_of_the_wrong_size_is_named(checkpoints, tmp_path):
    directory = tmp_path / "ck"
    shutil.copytree(checkpoints["gqa"][0], directory)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(98, 64)  # 96 neurons in config.json
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = ModelConfig.from_checkpoint(directory)
    with pytest.raises(UserError, match=r"up_proj.weight has shape \(98, 64\), expected \(96, 64\)"):
        load_model(directory, dtype=torch.float32, plan=ShardPlan.make(config, 0, 2))


def test_a_command_leaves_the_process_group(capsys):
    """Every command destroys the process group before exiting: gloo's threads outliving it
    abort the process at exit (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        code, out, err = run_main(capsys, "bench", "--preset", "tiny", "--device", "cpu", "--no-compile",
                                  "--new-tokens", 4, "--repeats", 1, "--prompt-len", 4, "--sparsity", 0)
        assert code == 0, err
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("raised,code,stderr", [("SystemExit(2)", 2, ""), ("SystemExit(None)", 0, ""),
                                                ("SystemExit('stopped')", 1, "stopped"),
                                                ("RuntimeError('boom')", 1, "RuntimeError: boom"), (None, 0, "")])
def test_a_rank_exits_with_the_code_in_flight(raised, code, stderr):
    """A torchrun rank ends through os._exit (exit_rank) with the exit code Python would have
    given: the SystemExit's code, or 1 and the traceback for any other exception."""
    body = f"    raise {raised}\n" if raised else "    print('done', flush=False)\n"
    script = ("from catsgen.parallel import exit_rank\ntry:\n" + body + "finally:\n    exit_rank()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    assert stderr in result.stderr
    if raised is None:
        assert result.stdout == "done\n"  # flushed before os._exit
