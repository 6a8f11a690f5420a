"""One generation over several devices of one host: the controller side (issue 5).

The process that loads the model (ComfyUI, the CLI) stays out of the GPU pipeline. It starts one
worker process per device (`python -m liveavatar_backend.parallel_worker`), each a torch.distributed
rank holding one layer range (see `stage.py`), and talks to them over authenticated local
connections (`multiprocessing.connection`): what to load, one job at a time, audio features on
request, finished block latents back. Hidden states move between the GPUs only through
torch.distributed (NCCL), never through this process.

The controller keeps the text encoder, wav2vec2 and the VAE, so decoding a clip here overlaps with
the workers' DiT work on the next clip. A worker that fails (out of memory, a bad file, killed)
ends every worker; the error names the rank, its device and what it printed, and the next job
starts fresh workers.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Listener, wait
from pathlib import Path

import torch

from . import constants as C
from .errors import CheckpointError, GenerationInterrupted, InputError
from .parallel_worker import AUTHKEY_ENV, CONTROLLER_ENV, DEVICE_ENV, recv_message, send_message
from .pipeline import GenerationPlan, ProgressEvent

log = logging.getLogger("liveavatar")

MAX_DEVICES = 8                    # issue 5: N = 1…8 devices of one host
POLL_SECONDS = 0.1                 # how often a waiting controller checks for stop requests
QUIT_GRACE_SECONDS = 10.0          # a worker asked to quit gets this long before it is killed
DRAIN_SECONDS = 120.0              # a stopped job may stay silent this long (a first compile, a CPU tick)
LOG_TAIL_CHARS = 2000              # of a failed worker's output, quoted in the error
WORKER_CPU_THREADS = 4             # at most this many CPU threads per worker (see start())
EXTERNAL_PREFIX = "external:"      # 'external:N': N workers started by torchrun connect to us
EXTERNAL_CONNECT_SECONDS = 600.0   # how long to wait for them


class WorkerError(RuntimeError):
    """A pipeline worker failed; the message names the rank, its device and the cause."""


def parse_devices(text: str) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1'] (also 'cpu,cpu' for the CPU test path)."""
    devices = [part.strip() for part in str(text).split(",") if part.strip()]
    if not devices:
        raise InputError("devices is empty; give 'cuda:0' or a list such as 'cuda:0,cuda:1'")
    if external_world(devices):
        return devices
    if len(devices) > MAX_DEVICES:
        raise InputError(f"devices lists {len(devices)} devices; at most {MAX_DEVICES} of one host are supported")
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(set(cuda)) != len(cuda):
        raise InputError(f"devices: {text!r} lists a GPU twice; each GPU takes one layer range")
    if len(devices) > 1 and 0 < len(cuda) < len(devices):
        raise InputError(f"devices: {text!r} mixes CPU and GPU; use GPUs only (or CPUs only, for tests)")
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"devices: {name!r} is not a device; use 'cpu', 'cuda:N' or a comma-separated list") from None
        if device.type == "cuda" and len(devices) > 1 and device.index is None:
            raise InputError(f"devices: {name!r} must name its index when several GPUs are listed, e.g. 'cuda:0,cuda:1'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"devices: {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return devices


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen | None          # None: started elsewhere (torchrun)
    log_path: Path | None
    conn: object = None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip() if self.log_path else ""
        except OSError:
            return ""


class PipelineWorkers:
    """The worker processes of one loaded model, one per device, started on demand.

    `devices` lists this host's devices (one worker is started for each), or is
    ['external:N']: N workers started by torchrun, on this and other hosts, connect to
    LIVEAVATAR_CONTROLLER (host:port, which this process listens on) with LIVEAVATAR_AUTHKEY."""

    def __init__(self, devices: list[str], load: dict, *, report: Callable[[str], None] = log.info,
                 extra_env: dict[str, str] | None = None):
        self.devices, self.load, self.report = list(devices), dict(load), report
        self.external = external_world(self.devices)
        self.extra_env = dict(extra_env or {})
        self.workers: list[_Worker] = []
        self.ready_bytes: list[int] = []
        self.last_reports: list[dict] = []
        self.job_id = 0

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return bool(self.workers) and all(w.exit_code() is None and not w.conn.closed for w in self.workers)

    def start(self, on_read: Callable[[int], None] | None = None) -> None:
        """Start one worker per device, load the weights in each, wait until all are ready.
        `on_read` hears the DiT elements the workers have read as they report them (a progress bar;
        it may raise to stop the load, which ends the workers)."""
        self.close()
        if self.external:
            return self._start_external(on_read)
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        package = Path(__file__).resolve().parent
        env_base = dict(os.environ, **self.extra_env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                        WORLD_SIZE=str(len(self.devices)), **{CONTROLLER_ENV: "%s:%d" % listener.address,
                                                              AUTHKEY_ENV: key.hex()})
        env_base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")]))
        # a worker's CPU work is small (RoPE tables, bookkeeping); N workers that each spin up one
        # OpenMP thread per core oversubscribe the CPU and starve the GPU of launches
        env_base.setdefault("OMP_NUM_THREADS", str(max(1, min(WORKER_CPU_THREADS, (os.cpu_count() or 1) // len(self.devices)))))
        try:
            for rank, device in enumerate(self.devices):
                log_file = tempfile.NamedTemporaryFile("w", prefix=f"liveavatar-worker{rank}-", suffix=".log",
                                                       delete=False)
                env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank), **{DEVICE_ENV: device})
                process = subprocess.Popen([sys.executable, "-m", f"{package.name}.parallel_worker"], env=env,
                                           stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=str(package.parent), start_new_session=True)
                log_file.close()
                self.workers.append(_Worker(rank, device, process, Path(log_file.name)))
            self._accept(listener)
            for worker in self.workers:
                send_message(worker.conn, dict(self.load))
            self.ready_bytes = [message[2] for message in self._collect("ready", on_read)]
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()
        self.report(f"{len(self.devices)} pipeline workers ready on {', '.join(self.devices)}")

    def _start_external(self, on_read: Callable[[int], None] | None) -> None:
        """Wait for N torchrun-started workers to connect, then load as usual."""
        if AUTHKEY_ENV not in os.environ or CONTROLLER_ENV not in os.environ:
            raise InputError(f"devices {self.devices[0]!r}: set {CONTROLLER_ENV}=host:port (this process listens "
                             f"there) and {AUTHKEY_ENV}=<hex key> here and for the torchrun workers")
        host, port = os.environ[CONTROLLER_ENV].rsplit(":", 1)
        listener = Listener(("0.0.0.0", int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
        self.workers = [_Worker(rank, "?", None, None) for rank in range(self.external)]
        self.report(f"waiting for {self.external} torchrun workers to connect to port {port}")
        try:
            self._accept(listener, timeout=EXTERNAL_CONNECT_SECONDS)
            for worker in self.workers:
                send_message(worker.conn, dict(self.load))
            self.ready_bytes = [message[2] for message in self._collect("ready", on_read)]
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()
        self.report(f"{self.external} pipeline workers ready on {', '.join(w.device for w in self.workers)}")

    def _accept(self, listener: Listener, timeout: float | None = None) -> None:
        """Accept every worker's connection, watching for workers that die before connecting."""
        accepted: list = []
        thread = threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in self.workers],
                                  daemon=True)
        thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(accepted) < len(self.workers):
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"only {len(accepted)} of {len(self.workers)} pipeline workers connected "
                                  f"within {timeout:.0f} s")
            time.sleep(POLL_SECONDS / 2)
        for conn in accepted:
            _, rank, world, device = recv_message(conn)     # ("hello", rank, world, device)
            if world != len(self.workers):
                raise WorkerError(f"a worker reports a world of {world} processes; expected {len(self.workers)}")
            self.workers[rank].conn, self.workers[rank].device = conn, device

    def close(self) -> None:
        """Ask every worker to quit; kill what is still running after the grace period."""
        for worker in self.workers:
            try:
                if worker.conn is not None and worker.exit_code() is None:
                    send_message(worker.conn, ("quit",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + QUIT_GRACE_SECONDS
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill(worker.process)
                worker.log_path.unlink(missing_ok=True)
            if worker.conn is not None:
                worker.conn.close()
        self.workers = []

    def _fail(self, message: str, error_type: type[Exception] = WorkerError):
        for worker in self.workers:
            _kill(worker.process)
        self.close()                       # (torchrun workers end when their connection closes)
        raise error_type(message)

    def _check_alive(self) -> None:
        """Fail naming an exited worker; one killed by a signal is the likely cause of the others."""
        dead = [w for w in self.workers if w.exit_code() is not None]
        if dead:
            worker = min(dead, key=lambda w: (w.exit_code() >= 0, w.rank))
            code = worker.exit_code()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            self._fail(f"pipeline worker {worker.rank} ({worker.device}) {how}; its last output:\n{worker.tail()}")

    # ------------------------------------------------------------------------------ messages
    def _messages(self) -> Iterator[tuple]:
        """Messages from any worker as they come, ("idle",) every POLL_SECONDS without one; raises
        when a worker reports an error or its process ends."""
        conns = {w.conn: w for w in self.workers}
        while True:
            ready = wait(list(conns), timeout=POLL_SECONDS)
            if not ready:
                self._check_alive()
                yield ("idle",)
                continue
            for conn in ready:
                worker = conns[conn]
                try:
                    message = recv_message(conn)
                except (EOFError, OSError):
                    try:
                        if worker.process is not None:
                            worker.process.wait(timeout=QUIT_GRACE_SECONDS)
                    except subprocess.TimeoutExpired:
                        pass
                    self._check_alive()
                    self._fail(f"pipeline worker {worker.rank} ({worker.device}) closed its connection")
                if message[0] == "error":
                    self._raise_worker_error(worker, message[2])
                yield message

    def _raise_worker_error(self, worker: _Worker, text: str):
        """A worker's own error: checkpoint and input errors keep their type (and message)."""
        time.sleep(POLL_SECONDS)            # a worker killed from outside makes the others fail too:
        if any((w.exit_code() or 0) < 0 for w in self.workers):
            self._check_alive()             # name the killed one, not the first to notice
        kind, _, detail = text.partition(": ")
        error_type = {"CheckpointError": CheckpointError, "InputError": InputError}.get(kind)
        if error_type is not None:
            self._fail(detail, error_type)
        self._fail(f"pipeline worker {worker.rank} ({worker.device}) failed: {text}")

    def _collect(self, kind: str, on_read: Callable[[int], None] | None = None) -> list[tuple]:
        """Wait for one `kind` message from every worker (by rank); `on_read` hears their load reports."""
        got: dict[int, tuple] = {}
        for message in self._messages():
            if message[0] == "loading" and on_read is not None:
                on_read(message[2])
            if message[0] == kind:
                got[message[1]] = message
                if len(got) == len(self.workers):
                    return [got[r] for r in range(len(self.workers))]

    # ---------------------------------------------------------------------------------- jobs
    def sample(self, plan: GenerationPlan, text_states: torch.Tensor, ref_latent: torch.Tensor,
               motion_latents: torch.Tensor, audio_features: Callable[[int, int], torch.Tensor], *,
               on_progress: Callable[[ProgressEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
        """Clean latents [16, 12, H8, W8] of each clip (CPU), in order, as the workers finish them."""
        if not self.running:
            self.start()
        self.job_id += 1
        job_id = self.job_id
        job = {"id": job_id, "plan": dataclasses.asdict(plan), "text_states": text_states.cpu()}
        for worker in self.workers:
            extra = {"ref_latent": ref_latent.cpu(), "motion_latents": motion_latents.cpu()} if worker.rank == 0 else {}
            send_message(worker.conn, ("job", dict(job, **extra)))
        rank0 = self.workers[0].conn
        blocks: list[torch.Tensor] = []
        finished: set[int] = set()
        reports: dict[int, dict] = {}
        stop_sent = False
        try:
            for message in self._messages():
                if should_stop is not None and not stop_sent and should_stop():
                    send_message(rank0, ("stop", job_id))
                    stop_sent = True
                kind = message[0]
                if kind == "audio":
                    _answer_audio(rank0, job_id, message[2], audio_features)
                elif kind == "block":
                    blocks.append(message[2])
                    block = message[1]
                    if on_progress is not None:
                        on_progress(ProgressEvent((block + 1) * plan.steps, plan.total_block_steps,
                                                  block // C.BLOCKS_PER_CLIP, block % C.BLOCKS_PER_CLIP,
                                                  plan.steps - 1, latents=message[2]))
                    if len(blocks) == C.BLOCKS_PER_CLIP:
                        yield torch.cat(blocks, dim=1)
                        blocks = []
                elif kind in ("done", "stopped"):
                    finished.add(message[1])
                    if kind == "done":
                        reports[message[1]] = message[2]
                    if len(finished) == len(self.workers):
                        if kind == "stopped" or stop_sent:
                            raise GenerationInterrupted("generation stopped on every device")
                        self.last_reports = [reports[r] for r in sorted(reports)]
                        return
        except (KeyboardInterrupt, SystemExit):
            self.close()                        # Ctrl-C: no waiting for the workers; the next job restarts them
            raise
        except BaseException:
            # the caller stopped reading (GeneratorExit) or its callback raised (ComfyUI's interrupt
            # comes from on_progress): the workers must leave this job before the next one starts
            self._abandon(job_id, finished, audio_features)
            raise

    def _abandon(self, job_id: int, finished: set[int], audio_features) -> None:
        """Stop the workers' job and read their messages up to its end, answering rank 0's audio
        requests meanwhile (it may be waiting for one). Workers silent for DRAIN_SECONDS, or a failure
        while draining, end them: the next job starts fresh ones."""
        if not self.running or len(finished) == len(self.workers):
            return
        rank0 = self.workers[0].conn
        try:
            send_message(rank0, ("stop", job_id))
            deadline = time.monotonic() + DRAIN_SECONDS
            for message in self._messages():
                if message[0] == "idle":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the workers sent nothing for {DRAIN_SECONDS:.0f} s after a stop")
                    continue
                deadline = time.monotonic() + DRAIN_SECONDS
                if message[0] == "audio":
                    _answer_audio(rank0, job_id, message[2], audio_features)
                elif message[0] in ("done", "stopped"):
                    finished.add(message[1])
                    if len(finished) == len(self.workers):
                        return
        except Exception as error:              # the caller's own exception is the one to report
            log.warning("ending the pipeline workers: %s", error)
            self.close()
        except BaseException:                   # Ctrl-C while draining: end them and stop now
            self.close()
            raise


def _answer_audio(rank0, job_id: int, clip: int, audio_features) -> None:
    """Rank 0 asks for a clip's audio features ahead of time; they travel on the CPU in float32."""
    features = audio_features(C.FRAMES_PER_CLIP * clip, C.FRAMES_PER_CLIP).float().cpu()
    send_message(rank0, ("audio", job_id, clip, features))


def external_world(devices: list[str]) -> int:
    """N for ['external:N'] (workers started by torchrun), else 0."""
    if len(devices) == 1 and devices[0].startswith(EXTERNAL_PREFIX):
        count = devices[0][len(EXTERNAL_PREFIX):]
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"devices {devices[0]!r}: give the number of torchrun workers, e.g. 'external:8'")
        return int(count)
    return 0


def _kill(process: subprocess.Popen | None) -> None:
    """End a worker and anything it started (it runs in its own session)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()
