"""The GPU paths: NCCL weight-sync group, CUDA IPC between a learner and a vLLM engine on one GPU,
vLLM sleep/wake under full colocation, bf16. They need CUDA (and the GPU install,
``scripts/install.sh gpu``); on CPU they skip with that reason. Each runs a short demo and checks
what the CPU tier checks: versions advance and vLLM's log-probabilities match the learner's."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.helpers import finished, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# bf16: vLLM's and the learner's kernels round differently; 2e-2 is a loose bound on the mean.
BF16_MISMATCH = 2e-2


def short_run(tmp_path, env, overrides: list[str]) -> list[dict]:
    out = train(
        ["--config", "demo", "iterations=5", f"logging.root={tmp_path}/runs", *overrides], env
    )
    _, history = finished(out, tmp_path / "runs")
    assert [h["rollout/weight_version"] for h in history] == list(range(5))
    return history


def test_full_colocation_with_cuda_ipc_and_sleep_wake_in_bf16(private_env, tmp_path):
    history = short_run(
        tmp_path,
        private_env,
        [
            "cluster.colocate=all",
            "cluster.generator.num_gpus=0.4",
            "cluster.learner.num_gpus=0.4",
            "cluster.reference.num_gpus=0.2",
            "weight_sync.method=cuda_ipc",
            "generator.gpu_memory_utilization=0.2",
            "model.dtype=bfloat16",
        ],
    )
    assert max(h["rollout/logprob_mismatch"] for h in history) < BF16_MISMATCH


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_collective_sync_over_nccl(private_env, tmp_path):
    history = short_run(
        tmp_path,
        private_env,
        [
            "cluster.generator.num_gpus=1",
            "cluster.learner.num_gpus=1",
            "weight_sync.method=collective",
            "weight_sync.verify_checksum=true",
            "generator.gpu_memory_utilization=0.3",
        ],
    )
    assert max(h["rollout/logprob_mismatch"] for h in history) < 1e-3
