"""Two ranks under the real launchers (gloo on CPU), each run checked end to end.

* ``deepspeed --num_gpus 2 --module vlscale.train``: ZeRO-2, gradient cache, distributed loss,
  evaluation on rank 0, DeepSpeed checkpoints — resuming from step 2 reproduces step 3's loss;
* ``accelerate launch --use_deepspeed --zero_stage 3 --offload_*_device cpu`` equals ``deepspeed``
  with the same settings in a ``--deepspeed_config`` file, step for step;
* ``accelerate launch --config_file`` with FSDP2 runs, and resumes on two accelerate "machines";
* ``launch/torchrun.sh`` on two "nodes" reports a bad setting once.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlscale.demo import child_env, launch_command
from vlscale.demo_data import build_demo_dataset


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _overrides(shards: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        "--recipe", "tiny-cpu", f"train.run_dir={run}", f"data.train_shards={shards['train']}",
        f"data.eval_shards={shards['eval']}", "data.num_workers=0",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64}",
        "model.embed_dim=16", "train.global_batch_size=12", "gradcache.chunk_size=4", "train.steps=3",
        "train.warmup_steps=1", "train.lr=3e-3", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "train.keep_checkpoints=3", "eval.batch_size=10", *extra,
    ]


def _launch(args: list[str], log: Path) -> None:
    cmd = launch_command("deepspeed", 2, _port(), args)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=child_env(2), stdout=fh, stderr=subprocess.STDOUT, timeout=420)
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{log.read_text()[-4000:]}"


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_launcher_zero2_two_ranks_and_exact_resume(tmp_path: Path) -> None:
    shards = build_demo_dataset(tmp_path / "shards", n_train=40, n_eval=4, size=32)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch(_overrides(shards, full, "train.ckpt_every=2", "train.eval_every=3"), tmp_path / "full.log")

    ds = json.loads((full / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["zero_optimization"]["stage"]) == (12, 6, 2)
    # the reduce bucket capped at the tiny model's size instead of DeepSpeed's 5e8 elements (2 GB fp32)
    assert 10**5 < ds["zero_optimization"]["reduce_bucket_size"] < 2 * 10**7
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval/n_images") == 4 for r in records)  # rank 0 evaluated the held-out shards
    ckpt = full / "checkpoints" / "step_000002"
    assert {"rank00000.pt", "rank00001.pt", "model.pt", "config.json"} <= {p.name for p in ckpt.iterdir()}
    engine_files = {p.name for p in (ckpt / "engine").rglob("*.pt")}
    assert any("optim_states" in name for name in engine_files), engine_files  # ZeRO-2 partitions
    assert len(json.loads((full / "memory.json").read_text())["ranks"]) == 2

    _launch(_overrides(shards, resumed, "--resume", str(ckpt)), tmp_path / "resumed.log")
    again = _losses(resumed)
    assert sorted(again) == [3]
    assert again[3] == losses[3], f"resumed step 3 loss {again[3]!r} != uninterrupted {losses[3]!r}"

    # The same checkpoint resumed by DeepSpeed's multi-node launcher: a hostfile of two 1-slot "nodes"
    # on this machine, one `deepspeed --hostfile --no_ssh --node_rank r` per node (as on a cluster
    # without passwordless ssh); each node's process is LOCAL_RANK 0 of global rank r.
    hosts, nodes, port = tmp_path / "hostfile", tmp_path / "two_nodes", _port()
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    procs = []
    for node in (0, 1):
        cmd = launch_command("deepspeed", 2, port, [*_overrides(shards, nodes, "--resume", str(ckpt))])
        at = cmd.index("--num_gpus")
        cmd[at:at + 2] = ["--hostfile", str(hosts), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
        fh = (tmp_path / f"node{node}.log").open("w")
        procs.append((subprocess.Popen(cmd, env=child_env(1), stdout=fh, stderr=subprocess.STDOUT), fh))
    for node, (proc, fh) in enumerate(procs):
        rc = proc.wait(timeout=420)
        fh.close()
        assert rc == 0, (tmp_path / f"node{node}.log").read_text()[-4000:]
    engine = json.loads((nodes / "engine.json").read_text())
    assert (engine["launcher"], engine["world_size"]) == ("deepspeed", 2), engine
    assert _losses(nodes) == {3: losses[3]}


# --------------------------------------------------------------------------- accelerate launch

def _accelerate(args: list[str], train_args: list[str]) -> list[str]:
    """``accelerate launch ... -m vlscale.train ...`` bound to this interpreter."""
    return [sys.executable, "-m", "accelerate.commands.launch", *args, "-m", "vlscale.train", *train_args]


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> str:
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env or child_env(2), stdout=fh, stderr=subprocess.STDOUT, timeout=420)
    text = log.read_text()
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def _settings(log: str) -> list[str]:
    """The conflict lines a run printed (each must appear once: rank 0 only)."""
    return [line.split("launch setting: ", 1)[1] for line in log.splitlines() if "launch setting: " in line]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=40, n_eval=4, size=32)


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_zero3_offload_equals_the_deepspeed_launcher_with_a_ds_config(
        shards: dict[str, Path], tmp_path: Path) -> None:
    """`accelerate launch --use_deepspeed --zero_stage 3 --offload_*_device cpu` runs ZeRO-3 with the
    optimizer and the parameters offloaded (DeepSpeed's checkpoint says so), with the same per-step
    losses as `deepspeed --num_gpus 2 ... --deepspeed_config` holding the same settings."""
    acc, ds_run = tmp_path / "accelerate", tmp_path / "deepspeed"
    log = _run(_accelerate(["--num_processes", "2", "--main_process_port", str(_port()), "--use_deepspeed",
                            "--zero_stage", "3", "--offload_optimizer_device", "cpu", "--offload_param_device", "cpu"],
                           _overrides(shards, acc)), tmp_path / "accelerate.log")
    assert _settings(log) == ["engine.zero_stage: 3 from accelerate zero_stage overrides 2 from the recipe tiny-cpu"]
    engine = json.loads((acc / "engine.json").read_text())
    assert (engine["launcher"], engine["world_size"], engine["zero_stage"]) == ("accelerate", 2, 3)
    assert (engine["offload_optimizer"], engine["offload_param"]) == ("cpu", "cpu")
    assert engine["sources"]["offload_optimizer"] == "accelerate offload_optimizer_device"
    assert engine["engine_reported"] == {"zero_stage": 3, "offload_optimizer": True, "offload_param": True,
                                              "fp16": False, "bf16": False, "world_size": 2}
    states = torch.load(acc / "checkpoints" / "step_000003" / "engine" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    zero = states["ds_config"]["zero_optimization"]
    assert (zero["stage"], zero["offload_optimizer"]["device"], zero["offload_param"]["device"]) == (3, "cpu", "cpu")
    assert states["ds_config"]["zero_force_ds_cpu_optimizer"] is False

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                         "offload_param": {"device": "cpu"}}}))
    log = _run(launch_command("deepspeed", 2, _port(), [*_overrides(shards, ds_run), "--deepspeed_config",
                                                        str(ds_json)]), tmp_path / "deepspeed.log")
    assert _settings(log) == [f"engine.zero_stage: 3 from ds_config {ds_json} overrides 2 from the recipe tiny-cpu"]
    assert json.loads((ds_run / "engine.json").read_text())["launcher"] == "deepspeed"
    a, d = _losses(acc), _losses(ds_run)
    assert sorted(a) == sorted(d) == [1, 2, 3]
    assert [a[s] for s in a] == pytest.approx([d[s] for s in a], rel=1e-6, abs=0), (a, d)


FSDP_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_offload_params: true
  fsdp_activation_checkpointing: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Block,BertLayer
  fsdp_state_dict_type: SHARDED_STATE_DICT
mixed_precision: bf16
machine_rank: 0
num_machines: 1
num_processes: 2
use_cpu: false
"""


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_fsdp2_config_file_runs_and_resumes_across_two_machines(
        shards: dict[str, Path], tmp_path: Path) -> None:
    """`accelerate launch --config_file` (FSDP2: CPU offload, activation checkpointing, per-layer wrap,
    bf16) runs vlscale's FSDP2 engine on 2 gloo processes; its step-2 checkpoint, resumed by the same
    config launched as two accelerate "machines" (--num_machines 2 --machine_rank 0|1), gives step 3's
    loss exactly."""
    yaml = tmp_path / "fsdp.yaml"
    yaml.write_text(FSDP_YAML)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    log = _run(_accelerate(["--config_file", str(yaml), "--main_process_port", str(_port())],
                           _overrides(shards, full, "train.ckpt_every=2")), tmp_path / "full.log")
    assert _settings(log) == [
        "engine.kind: 'fsdp' from accelerate use_fsdp overrides 'deepspeed ZeRO-2' from the recipe tiny-cpu",
        "model.grad_checkpointing: True from accelerate fsdp_activation_checkpointing overrides False from the recipe tiny-cpu",
        "train.precision: 'bf16' from accelerate mixed_precision overrides 'fp32' from the recipe tiny-cpu",
    ]
    engine = json.loads((full / "engine.json").read_text())
    assert (engine["engine"], engine["precision"], engine["grad_checkpointing"]) == ("fsdp", "bf16", True)
    assert engine["fsdp"] == {"reshard_after_forward": True, "offload_params": True,
                              "shard_plan": "classes Block,BertLayer + towers + root"}
    assert engine["engine_reported"]["offload_policy"] == "CPUOffloadPolicy"
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3]

    port, procs = _port(), []
    for machine in (0, 1):
        cmd = _accelerate(["--config_file", str(yaml), "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                           str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
                          [*_overrides(shards, resumed), "--resume", str(full / "checkpoints" / "step_000002")])
        fh = (tmp_path / f"machine{machine}.log").open("w")
        procs.append((subprocess.Popen(cmd, env=child_env(1), stdout=fh, stderr=subprocess.STDOUT), fh))
    for proc, fh in procs:
        rc = proc.wait(timeout=420)
        fh.close()
        assert rc == 0, (tmp_path / f"machine{procs.index((proc, fh))}.log").read_text()[-4000:]
    again = _losses(resumed)
    assert sorted(again) == [3] and again[3] == losses[3], (again, losses)
    assert json.loads((resumed / "engine.json").read_text())["world_size"] == 2


@pytest.mark.dist
def test_torchrun_two_nodes_report_a_failure_once(tmp_path: Path) -> None:
    """launch/torchrun.sh on two "nodes" of one machine (NNODES=2, NODE_RANK=0|1, MASTER_ADDR=127.0.0.1):
    the two agents rendezvous and start global ranks 0 and 1; a bad launch setting is then reported in
    one line by rank 0, with no traceback from any rank."""
    missing = tmp_path / "missing.json"
    env = child_env(1) | {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()),
                          "PYTHON": sys.executable}
    procs = [subprocess.Popen(["bash", "launch/torchrun.sh", "--recipe", "tiny-cpu", "--deepspeed_config", str(missing)],
                              cwd=Path(__file__).resolve().parents[1], env=env | {"NODE_RANK": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), outs
    text = "\n".join(outs)
    errors = [line for line in text.splitlines() if "vlscale train: error" in line]
    assert errors == [f"vlscale train: error: --deepspeed_config / engine.ds_config: no such file {str(missing)!r} "
                      "(--debug for the traceback)"], text
    assert "vlscale/train" not in text  # no frame of vlscale's: no per-rank traceback
