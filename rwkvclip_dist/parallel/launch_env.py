"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

One function reads the environment of every launcher we support, in this order:
torchrun and the ``deepspeed`` launcher (both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT), then Slurm (``srun`` exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the node
list, whose first host becomes the master), then a plain ``python`` process (world size 1).
``export_to_environ`` writes the result back as the torch variables so that
``torch.distributed.init_process_group("env://")`` and DeepSpeed find the same values.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """'torchrun' (also the deepspeed launcher), 'slurm' or 'single'."""


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. ``gpu[01-03,7],login1`` -> 4 + 1 names."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def _slurm_port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    # Derive the port from the job id so that two jobs sharing a node do not collide.
    job = env.get("SLURM_JOB_ID", "0")
    return 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank and rendezvous information from torchrun/deepspeed, Slurm, or default to one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("running under Slurm (SLURM_PROCID is set) but SLURM_JOB_NODELIST is missing")
        world = _int(env, "SLURM_NTASKS")
        nodes = _int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else len(expand_nodelist(nodelist))
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=max(1, world // max(1, nodes)),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=_slurm_port(env),
            launcher="slurm",
        )
    # A lone process still needs a process group (DeepSpeed insists); a free port avoids clashing
    # with other single-process runs on the same machine.
    return LaunchEnv(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                     _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port(), "single")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_variables(launch: LaunchEnv) -> dict[str, str]:
    """``launch`` as the variables torch.distributed's env:// rendezvous and DeepSpeed read (what the
    deepspeed launcher gives each rank)."""
    return {
        "RANK": str(launch.rank),
        "WORLD_SIZE": str(launch.world_size),
        "LOCAL_RANK": str(launch.local_rank),
        "LOCAL_WORLD_SIZE": str(launch.local_world_size),
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": str(launch.master_port),
    }


def export_to_environ(launch: LaunchEnv) -> None:
    """Publish ``launch`` in this process's environment (:func:`rank_variables`)."""
    os.environ.update(rank_variables(launch))
