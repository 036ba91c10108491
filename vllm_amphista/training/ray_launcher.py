"""Data-parallel training on Ray Train: `vllm-amphista train --num-workers N`.

Each Ray worker loads the recorded distillation shards and the target's frozen lm_head,
rebuilds the draft model from the driver's initial weights (so the token map and
initialisation are the driver's), and runs training.loop.train under torch DDP; Ray Train
sets up the process group (gloo on CPU, NCCL on GPU). Rank 0 writes the resumable state
file into the output folder, which the driver reads back. Connects to an existing
cluster when RAY_ADDRESS is set; otherwise starts a local one. The output folder and the
data cache must be on storage every worker can reach.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.paths import CACHE_DIR
from vllm_amphista.training.data import load_shards, split
from vllm_amphista.training.loop import train
from vllm_amphista.training.settings import STATE_FILE, TrainSettings


def _worker(job: dict) -> None:
    import ray.train.torch  # Ray is optional and heavy: imported only where it runs

    settings = TrainSettings(**job["settings"])
    target = TargetWeights.from_folder(job["target_dir"])
    train_set, eval_set = split(load_shards([Path(p) for p in job["data_paths"]]),
                                settings.eval_fraction, settings.seed)
    model = AmphistaDraftModel(AmphistaConfig.from_dict(job["config"]))
    model.load_state_dict(job["initial_state"])
    model.attach_target(target)
    model.to(ray.train.torch.get_device())
    train(model, target.lm_head.float(), train_set, eval_set, settings, Path(job["work_dir"]))


def train_on_ray(model: AmphistaDraftModel, target_dir: Path, data_paths: list[Path],
                 settings: TrainSettings, work_dir: Path, num_workers: int,
                 use_gpu: bool = False) -> list[dict]:
    """Train `model` in place on `num_workers` Ray workers; returns the eval history."""
    import ray  # optional and heavy: imported only where it runs
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = {"config": model.config.to_dict(), "settings": asdict(settings),
           "initial_state": {k: v.cpu() for k, v in model.state_dict().items()},
           "target_dir": str(Path(target_dir).resolve()),
           "data_paths": [str(Path(p).resolve()) for p in data_paths],
           "work_dir": str(work_dir.resolve())}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False)
    try:
        TorchTrainer(_worker, train_loop_config=job,
                     scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                     run_config=RunConfig(storage_path=str(CACHE_DIR / "ray"))).fit()
    except Exception as e:  # Ray wraps worker errors; keep the first line readable
        raise RuntimeError(f"Ray Train with {num_workers} workers failed: {e}") from e
    finally:
        if started_here:
            ray.shutdown()
    state = torch.load(work_dir / STATE_FILE, weights_only=False, map_location="cpu")
    model.load_state_dict(state["model"])
    return state["history"]
