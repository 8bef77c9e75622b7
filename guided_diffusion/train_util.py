"""Training runs: :func:`train` (what ``scripts/image_train.py`` calls) and the official module name.

``guided_diffusion.train_util`` keeps the names code written for guided-diffusion / SDM imports
(``TrainLoop``, ``update_ema``, ...); the pieces live in their own modules:

* :mod:`.infra.train_config` -- ``TrainConfig`` (flags), validation, the flat ``config.json``;
* :mod:`.infra.train_state` -- seeds, RNG and timestep-sampler state in a ``weights_only`` form;
* :mod:`.infra.train_loop` -- ``TrainLoop`` (steps, EMA, mixed precision, logging);
* :mod:`.infra.checkpoint_folder` -- the run folder's checkpoints: names, markers, resume and save.

Set-up order of :func:`train`: every user input is checked before anything is written (settings,
``--resume_checkpoint`` and the "folder already holds checkpoints" case, the model, the dataset,
the resume checkpoint loaded into the model); only then is the run folder created.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch

from . import dist_util, logger
from .data.training import DataSettings, load_data, open_batches  # noqa: F401  (load_data: official name)
from .infra import fileio, runlock
from .infra.checkpoint_folder import (  # noqa: F401  (the loop's checkpoint API, re-exported)
    ResumePlan,
    check_fresh_start,
    checkpoint_filenames,
    ema_filename,
    find_latest_checkpoint,
    list_complete_checkpoints,
    marker_filename,
    parse_resume_step_from_filename,
    plan_resume,
    checkpoint_bytes,
    disk_use_notice,
    prune_checkpoints,
    remove_stale_temporaries,
    resolve_resume_checkpoint,
    valid_marker,
    write_checkpoint,
)
from .infra.errors import DiffMixError
from .infra.precision import resolve_precision, sdm_half
from .infra.train_config import TrainConfig, flat_config, parse_ema_rates, validate_train_config  # noqa: F401
from .infra.train_loop import INITIAL_LOG_LOSS_SCALE, TrainLoop, drop_condition, log_loss_dict, update_ema  # noqa: F401
from .infra.train_state import (  # noqa: F401
    capture_global_rng,
    derive_seed,
    load_sampler_state,
    restore_global_rng,
    sampler_state,
)
from .resample import create_named_schedule_sampler
from .script_util import create_model_and_diffusion


def train(model_cfg: Any, train_cfg: TrainConfig, data: Optional[Iterator] = None) -> TrainLoop:
    """Run a whole training job (set-up, model, data, loop); returns the finished loop.

    ``model_cfg`` is a :class:`guided_diffusion.infra.config.ModelConfig`. ``data`` replaces the dataset
    reader (tests, custom pipelines). Call inside :func:`guided_diffusion.infra.errors.run_cli`.

    Every user input is checked before anything is written: settings, the resume file and the
    "folder already holds checkpoints" case, the model, the dataset, and the resume checkpoint
    (loaded into the model). Only then is the run folder created and the logger configured, so a
    failed start leaves no folder behind; messages before that point reach the terminal only.
    """
    validate_train_config(train_cfg)
    if data is None and not train_cfg.data_dir:
        raise DiffMixError("--data_dir is required (a dataset root holding Train/Images and Train/Labels)")
    if data is None and not fileio.exists(train_cfg.data_dir):
        raise DiffMixError(f"{train_cfg.data_dir}: --data_dir not found")
    if train_cfg.deterministic:
        # Before CUDA starts (setup_dist pins the device): cuBLAS reads this variable once.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    info = dist_util.setup_dist()
    precision = resolve_precision(train_cfg.precision, dist_util.dev(), sdm_half(bool(getattr(model_cfg, "use_fp16", False))))
    log_dir = dist_util.broadcast_object(train_cfg.log_dir or logger.default_dir())
    # Cheap checks of the run folder first, before the model and the dataset take their time.
    runlock.acquire_on_rank0(log_dir, "training", info.rank, dist_util.broadcast_object, "--log_dir", check_only=True)
    resume = plan_resume(train_cfg.resume_checkpoint, log_dir)

    # Same seed on every rank, so all ranks build identical weights (also broadcast by the loop).
    torch.manual_seed(train_cfg.seed)
    model, diffusion = create_model_and_diffusion(**model_cfg.to_dict())
    model.to(dist_util.dev())
    if train_cfg.crop_size:
        try:
            model.check_size(train_cfg.crop_size, train_cfg.crop_size)
        except DiffMixError as e:
            raise DiffMixError(f"--crop_size {train_cfg.crop_size}: {e}") from None
    # Built here, not in from_config, so a sampler setting that cannot work fails before the data is read.
    sampler = create_named_schedule_sampler(train_cfg.schedule_sampler, diffusion, train_cfg.t_max)
    if data is None:
        logger.log(f"reading {train_cfg.data_dir} ({train_cfg.dataset_mode})...")
        data = open_batches(DataSettings.from_config(train_cfg, model_cfg, progress=info.rank == 0))
        data_classes = getattr(data, "num_classes", model_cfg.num_classes)
        if data_classes != model_cfg.num_classes:
            raise DiffMixError(
                f"{train_cfg.data_dir}: dataset mode {train_cfg.dataset_mode!r} has {data_classes} classes "
                f"but --num_classes is {model_cfg.num_classes}"
            )
    # Builds the optimizer and loads the resume checkpoint (a bad file fails here, nothing written yet).
    loop = TrainLoop.from_config(
        model=model,
        diffusion=diffusion,
        data=data,
        cfg=train_cfg,
        use_fp16=bool(getattr(model_cfg, "use_fp16", False)),
        schedule_sampler=sampler,
        resume_checkpoint=resume,
        log_dir=log_dir,
        precision=precision,
        config=flat_config(model_cfg, train_cfg, precision_resolved=precision, world_size=info.world_size),
        prepare_folder=False,
    )

    # Everything checked: from here on the run folder is written.
    run_lock = runlock.acquire_on_rank0(log_dir, "training", info.rank, dist_util.broadcast_object, "--log_dir")
    logger.configure(log_dir, resume_step=resume.step)
    loop.prepare_folder()
    logger.log(
        f"run folder {log_dir}; rank {info.rank}/{info.world_size} ({info.launcher}, {info.backend}) "
        f"on {dist_util.dev()}; precision {precision}"
    )
    if loop.resumed_from is not None:
        logger.log(f"resumed from {loop.resumed_from} at step {loop.step}")
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"model: {n_params / 1e6:.2f} M parameters; global batch {train_cfg.batch_size * info.world_size}")
    if info.rank == 0 and (notice := disk_use_notice(log_dir, checkpoint_bytes(n_params, len(loop.ema_rates)),
                                                     train_cfg.keep_checkpoints, loop.end_step or 0,
                                                     train_cfg.save_interval, loop.step)):
        logger.log(notice)
    if loop.end_step is None:
        logger.log("no --max_steps or --lr_anneal_steps: training runs until interrupted")
    logger.log("training...")
    loop.run_loop()
    logger.log(f"done at step {loop.step}; checkpoints in {log_dir}")
    if run_lock is not None:
        run_lock.release()
    return loop
