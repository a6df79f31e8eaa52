"""MONAI Label under load: C concurrent ``/infer`` clients for D seconds against a served scratch_baseline bundle,
with a ``/train`` started during the load.

    python scripts/bench_monailabel.py                                   # 8 clients, 60 s, a local server
    python scripts/bench_monailabel.py --clients 4 --duration 30 --train false
    python scripts/bench_monailabel.py --url http://127.0.0.1:8000 --pid 1234   # attach to a running server

Without ``--url`` a server is started on 127.0.0.1 (a free port) with ``scripts/start_monailabel.sh``, in
``--work`` (default ``/tmp/medcl_bench_monailabel``, emptied first; never the repository): a 4-case 32³ phantom
studies folder (labels for 3 cases), the scratch_baseline bundle with ``num_workers=0``, 32³ patches and 4
iterations an epoch, and randomly initialised weights that a first ``/train`` of ``--warmup_epochs`` epochs
replaces with trained ones before the load starts. With ``--url`` the server's datastore images are used, and
``--pid`` (the server's process id) enables the memory figures.

The load: one ``/infer`` alone first (the "first request"; the server loads the network then), then ``--clients``
threads each post ``/infer/<model>?image=<id>&output=image`` in a loop (images round robin) until ``--duration``
seconds have passed; a request in flight at the end is waited for. Every request has a timeout of ``--timeout``
seconds (on connecting and on every read), so none can hang the benchmark. ``--train_at`` seconds into the load,
``POST /train/<model>`` starts a training run (``--train_epochs``, CPU) and ``GET /train/`` is polled until the task
leaves SUBMITTED/RUNNING (or ``--train_timeout`` passes); the load does not wait for it, the figures below do.

One JSON line: ``requests`` (answered load requests), ``ok`` (HTTP 200 with a gzip body), ``requests_per_s`` (ok
answers per second of load), ``p50_s``/``p95_s``/``max_s`` (latency of the load requests, request sent to body read),
``errors`` (count by kind: ``http_<code>``, ``timeout``, ``connection_dropped``, ``connection_refused``,
``bad_body``, ``error_<exception>``) with ``error_examples`` (the first message of each kind), ``rss_first_mib``
(resident memory of the server's process tree after the first request), ``rss_end_mib`` (after the load and the
training run), ``rss_peak_mib`` (sampled every 0.5 s; includes the training subprocess), ``rss_ratio``
(end / first), ``train_status``, ``train_s`` (POST to the end of the task) and, for a local server,
``model_changed`` (the served model.pt differs after the training run) and the versions of the server's venv.
``first_request_*`` and ``last_request_*`` (one ``/infer`` after the load and the training run, served by the new
weights) are not part of the load figures; ``train_details`` (the end of the task's log) is filled when the training
run did not end DONE.

MONAI Label 0.8.5 runs each inference inside its asyncio event loop (``async def`` endpoint calling the blocking
``app.infer``), so concurrent requests are answered one at a time: latency grows with the number of clients, and
``/train`` or ``/info/`` requests wait in the same queue (see docs/monai_label.md).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MONAILABEL_VENV = Path(os.environ.get("MEDCL_MONAILABEL_VENV", REPO / ".venv-monailabel"))
MODEL = "scratch_baseline"
# tiny volumes on a 2-core CPU: no loader workers, 32³ patches, 4 iterations an epoch
SERVER_SETS = ("num_workers=0", "patch_size=[32,32,32]", "epoch_length=4")
GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------------------------------------
# HTTP


def request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None, timeout=120.0):
    """One HTTP request; returns ``(status, body)``. Raises what urllib raises (``HTTPError`` for 4xx/5xx)."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def classify(exc: BaseException) -> tuple[str, str]:
    """The kind of a failed request and its message: ``http_<code>`` with the start of the response body, or
    ``timeout``, ``connection_dropped``, ``connection_refused``, ``error_<type>`` with the exception text."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            body = exc.read().decode("utf-8", "replace")
        except Exception as e:  # the error body itself could not be read
            body = f"<body unreadable: {e!r}>"
        return f"http_{exc.code}", body.strip()[:300]
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timeout", str(reason)
    if isinstance(reason, ConnectionRefusedError):
        return "connection_refused", str(reason)
    if isinstance(
        reason,
        (
            ConnectionResetError,
            ConnectionAbortedError,
            BrokenPipeError,
            http.client.RemoteDisconnected,
            http.client.IncompleteRead,
        ),
    ):
        return "connection_dropped", repr(reason)
    return f"error_{type(reason).__name__}", str(reason)[:300]


def infer_once(url: str, image: str, model: str = MODEL, timeout: float = 120.0) -> dict:
    """``POST /infer/<model>?image=<image>&output=image``: ``{"kind", "latency_s", "message", "start"}`` where kind is
    ``ok`` for a 200 whose body is a gzip file (the label NIfTI), ``bad_body`` for a 200 without one, else
    :func:`classify`'s kind. Never raises for a failed request."""
    start = time.perf_counter()
    try:
        status, body = request(f"{url}/infer/{model}?image={image}&output=image", method="POST", timeout=timeout)
        if status == 200 and body[:2] == GZIP_MAGIC:
            kind, message = "ok", ""
        else:
            kind, message = "bad_body", f"status {status}, {len(body)} bytes starting {body[:40]!r}"
    except Exception as e:
        kind, message = classify(e)
    return {"kind": kind, "latency_s": time.perf_counter() - start, "message": message, "start": start}


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0, log: Path | None = None):
    """Poll ``/info/`` until it answers; returns its JSON. Fails (RuntimeError) when ``proc`` exits or on timeout."""
    deadline = time.time() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            return json.loads(request(f"{url}/info/", timeout=5)[1])
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.time() > deadline:
                raise RuntimeError(f"no answer from {url} in {timeout:.0f} s:\n{_tail(log)}") from None
            time.sleep(1)


def train_and_wait(
    url: str, model: str = MODEL, epochs: int = 2, timeout: float = 600.0, poll_s: float = 2.0, req_timeout=120.0
) -> dict:
    """``POST /train/<model>`` (CPU, ``epochs`` epochs, a quarter of the labelled cases for validation), then poll
    ``GET /train/`` until the task is neither SUBMITTED nor RUNNING or ``timeout`` seconds passed. Returns
    ``{"status", "seconds", "details"}``: status DONE/ERROR/... , ``not_started: <message>`` when the POST failed,
    ``still_running`` on timeout; ``details`` is the end of the task's log."""
    params = {"max_epochs": epochs, "device": "cpu", "multi_gpu": False, "val_split": 0.25}
    start = time.perf_counter()
    try:
        status, data = request(
            f"{url}/train/{model}",
            method="POST",
            data=json.dumps(params).encode(),
            headers={"Content-Type": "application/json"},
            timeout=req_timeout,
        )
    except Exception as e:
        kind, message = classify(e)
        return {"status": f"not_started: {kind} {message}", "seconds": time.perf_counter() - start, "details": ""}
    task = json.loads(data)
    while task.get("status") in ("SUBMITTED", "RUNNING"):
        if time.perf_counter() - start > timeout:
            return {"status": "still_running", "seconds": time.perf_counter() - start, "details": ""}
        time.sleep(poll_s)
        try:
            task = json.loads(request(f"{url}/train/", timeout=req_timeout)[1])
        except Exception as e:  # a poll that failed is retried until the timeout
            task = {"status": "RUNNING", "poll_error": classify(e)}
    details = "\n".join(task.get("details", [])[-20:])
    return {"status": task.get("status"), "seconds": time.perf_counter() - start, "details": details}


# --------------------------------------------------------------------------------------------------------------------
# memory


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_rss_mib(pid: int) -> float:
    """Summed resident memory (VmRSS) of ``pid`` and its descendants, in MiB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:  # exited meanwhile
            pass
    return total / 1024


# --------------------------------------------------------------------------------------------------------------------
# the load


def run_load(
    url: str,
    images: list[str],
    model: str = MODEL,
    clients: int = 8,
    duration: float = 60.0,
    timeout: float = 120.0,
    train_at: float | None = 5.0,
    train_epochs: int = 2,
    train_timeout: float = 600.0,
    pid: int | None = None,
) -> dict:
    """The load described in the module docstring against a ready server; returns the figures (see there) plus
    ``records`` (every load request: kind, latency_s, message, start, client index)."""
    first = infer_once(url, images[0], model, timeout)
    rss_first = tree_rss_mib(pid) if pid else None

    records: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    peak = [rss_first or 0.0]
    train_result: dict = {}
    load_start = time.perf_counter()
    deadline = load_start + duration

    def client(i: int) -> None:
        n = i
        while time.perf_counter() < deadline:
            rec = infer_once(url, images[n % len(images)], model, timeout)
            rec["client"] = i
            n += 1
            with lock:
                records.append(rec)

    def sampler() -> None:
        while not stop.wait(0.5):
            peak[0] = max(peak[0], tree_rss_mib(pid))

    def trainer() -> None:
        time.sleep(train_at)
        train_result.update(train_and_wait(url, model, train_epochs, train_timeout, req_timeout=timeout))
        train_result["started_at_s"] = train_at

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    if pid:
        threads.append(threading.Thread(target=sampler, daemon=True))
    train_thread = threading.Thread(target=trainer, daemon=True) if train_at is not None else None
    for t in threads + ([train_thread] if train_thread else []):
        t.start()
    for t in threads[:clients]:
        t.join()  # each returns by deadline + timeout: a request in flight is bounded by its timeout
    load_s = time.perf_counter() - load_start
    if train_thread:
        train_thread.join()
    last = infer_once(url, images[-1], model, timeout)  # served by the weights the training run wrote
    stop.set()
    rss_end = tree_rss_mib(pid) if pid else None

    latencies = sorted(r["latency_s"] for r in records)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in records:
        if r["kind"] != "ok":
            errors[r["kind"]] = errors.get(r["kind"], 0) + 1
            examples.setdefault(r["kind"], r["message"])
    ok = sum(r["kind"] == "ok" for r in records)
    return {
        "clients": clients,
        "duration_s": duration,
        "timeout_s": timeout,
        "first_request_s": round(first["latency_s"], 3),
        "first_request_kind": first["kind"],
        "last_request_s": round(last["latency_s"], 3),
        "last_request_kind": last["kind"],
        "load_s": round(load_s, 1),
        "requests": len(records),
        "ok": ok,
        "requests_per_s": round(ok / load_s, 2),
        "p50_s": round(quantiles[49], 3) if latencies else None,
        "p95_s": round(quantiles[94], 3) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies else None,
        "errors": errors,
        "error_examples": examples,
        "rss_first_mib": round(rss_first, 1) if rss_first else None,
        "rss_end_mib": round(rss_end, 1) if rss_end else None,
        "rss_peak_mib": round(peak[0], 1) if pid else None,
        "rss_ratio": round(rss_end / rss_first, 3) if rss_first and rss_end else None,
        "train_status": train_result.get("status"),
        "train_s": round(train_result["seconds"], 1) if train_result else None,
        "train_started_at_s": train_result.get("started_at_s"),
        "train_details": train_result.get("details", "") if train_result.get("status") != "DONE" else "",
        "records": records,
    }


# --------------------------------------------------------------------------------------------------------------------
# a local server


def make_studies(work: Path, n: int = 4) -> tuple[Path, Path]:
    """An ``n``-case 32³ phantom in MSD layout and MONAI Label's studies folder made from it: all images at the top
    level, the labels of the first n-1 in labels/final/ under the images' file names."""
    from medcl.data.phantom import generate_dataset

    dataset = work / "phantom"
    generate_dataset(str(dataset), n=n, n_test=0, seed=0, shape=(32, 32, 32))
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, image in enumerate(sorted((dataset / "imagesTr").glob("*.nii.gz"))):
        shutil.copy(image, studies / image.name)
        if i < n - 1:
            shutil.copy(dataset / "labelsTr" / image.name, studies / "labels" / "final" / image.name)
    return dataset, studies


def random_checkpoint(dataset: Path, out: Path, model: str = MODEL) -> Path:
    """``out``: the state dict of the bundle's untrained ``network_def`` (enough to serve until a /train)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / model / "configs" / "inference.json"))
    parser["dataset_dir"] = str(dataset)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``scripts/start_monailabel.sh`` on 127.0.0.1 in ``work`` (studies, app, log), in its own process group.

    Use as a context manager; ``url``, ``proc``, ``app``, ``log``, ``images`` (datastore ids) are set on entry and
    the whole group (server and training subprocess) is stopped on exit.
    """

    def __init__(self, work: Path, model: str = MODEL, sets: tuple[str, ...] = SERVER_SETS, ready_timeout=180.0):
        self.work, self.model, self.sets, self.ready_timeout = Path(work), model, sets, ready_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        dataset, studies = make_studies(self.work)
        checkpoint = random_checkpoint(dataset, self.work / "model.pt", self.model)
        self.app, self.log, port = self.work / "app", self.work / "server.log", free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.images = sorted(p.name[: -len(".nii.gz")] for p in studies.glob("*.nii.gz"))
        cmd = ["bash", str(REPO / "scripts" / "start_monailabel.sh"), "--app", str(self.app)]
        cmd += ["--studies", str(studies), "--bundle", self.model, "--model", str(checkpoint)]
        cmd += ["--dataset", str(dataset), "--port", str(port)]
        for s in self.sets:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self.info = wait_ready(self.url, self.proc, self.ready_timeout, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def model_file(self) -> Path:
        return self.app / "model" / self.model / "models" / "model.pt"

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        return _tail(self.log, n)

    def __exit__(self, *exc) -> None:
        # the server and its training subprocess share the process group that start_new_session made
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._log.close()


def _tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text()[-n:] if log and log.exists() else ""


def server_versions() -> dict:
    """torch, MONAI and MONAI Label versions of the MONAI Label venv."""
    code = (
        "import json, torch, monai, monailabel; print(json.dumps({'torch': torch.__version__, "
        "'monai': monai.__version__, 'monailabel': monailabel.__version__}))"
    )
    out = subprocess.run([str(MONAILABEL_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}


def main(
    url: str | None = None,
    pid: int | None = None,
    clients: int = 8,
    duration: float = 60.0,
    timeout: float = 120.0,
    train: bool = True,
    train_at: float = 5.0,
    train_epochs: int = 2,
    train_timeout: float = 600.0,
    warmup_epochs: int = 2,
    model: str = MODEL,
    work: str = "/tmp/medcl_bench_monailabel",
    records: bool = False,
) -> None:
    """Run the benchmark (see the module docstring) and print one JSON line; ``--records`` keeps every request."""
    if isinstance(train, str):  # fire passes "--train false" as the string "false"
        train = train.strip().lower() not in ("false", "0", "no", "off", "")
    train_at_s = train_at if train else None
    if url:
        objects = json.loads(request(f"{url}/datastore/?output=all", timeout=timeout)[1])["objects"]
        result = run_load(url, sorted(objects), model, clients, duration, timeout, train_at_s, train_epochs,
                          train_timeout, pid)  # fmt: skip
    else:
        work_dir = Path(work)
        if work_dir.resolve().is_relative_to(REPO):
            raise SystemExit(f"--work {work} is inside the repository; give a folder outside it")
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        with LocalServer(work_dir, model) as server:
            warmup = _warmup(server, warmup_epochs, train_timeout)
            before = server.model_file.read_bytes()
            result = run_load(server.url, server.images, model, clients, duration, timeout, train_at_s, train_epochs,
                              train_timeout, server.proc.pid)  # fmt: skip
            result["model_changed"] = server.model_file.read_bytes() != before
            result.update(warmup_train_s=warmup, server="local 127.0.0.1", versions=server_versions())
    if not records:
        result.pop("records")
    print(json.dumps(result), flush=True)


def _warmup(server: LocalServer, epochs: int, timeout: float) -> float | None:
    """A first /train of ``epochs`` epochs, so that the load is served by trained weights; its seconds."""
    if epochs <= 0:
        return None
    res = train_and_wait(server.url, server.model, epochs, timeout)
    if res["status"] != "DONE":
        raise RuntimeError(f"warm-up training {res['status']}:\n{res['details']}\n{server.tail()}")
    return round(res["seconds"], 1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
