"""Start-up: the port opens before torch is loaded, and a worker sizes torch's pools to its share of the cores.

Why these hold: ``Node.start`` opens the port right after spool recovery and
starts the pipeline (embedded worker, stages' warm-up, which imports torch)
in a background thread afterwards; a worker sizes torch's pools when its
stages are imported (``Runtime.size_pools``), never importing torch for it.
Real processes and a real association; no timing is asserted (the machine
running the tests may be loaded): the speed is benchmarks/startup.py's job.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.runtime.runner import threads_per_slot, usable_cores
from nodeutil import NODE_AET, REPO, NodeProcess

PROC = Path("/proc")


def echo_ok(port: int) -> bool:
    """One association, one C-ECHO; False while nothing listens yet."""
    ae = AE(ae_title="STARTUPTEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return bool(rsp) and int(rsp.Status) == 0
    finally:
        assoc.release()


def torch_mapped(pid: int) -> bool:
    return "libtorch" in (PROC / str(pid) / "maps").read_text()


@pytest.mark.skipif(not (PROC / "self" / "maps").exists(), reason="needs /proc/<pid>/maps (Linux)")
def test_serve_answers_c_echo_before_torch_is_loaded_and_the_warm_up_loads_it_afterwards(tmp_path: Path) -> None:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # each refused poll would log an error
    node = NodeProcess(tmp_path / "data", torch_threads=1)
    node.data_dir.mkdir(parents=True)
    with open(node.log_path, "ab") as logf:
        node.proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve"], env=node.env(), cwd=REPO,
                                     stdout=logf, stderr=logf)
    pid = node.proc.pid
    try:
        deadline = time.monotonic() + 300
        while not echo_ok(node.port):
            assert node.proc.poll() is None, f"serve exited with {node.proc.returncode}:\n{node.log()}"
            assert time.monotonic() < deadline, f"no C-ECHO answer within 300 s:\n{node.log()}"
            time.sleep(0.05)
        assert not torch_mapped(pid), "torch was loaded before the port answered:\n" + node.log()
        # The positive control (the check above can see torch): the embedded worker's warm-up loads it,
        # in the background, with the pool size the setting asks for, while the listener keeps answering.
        deadline = time.monotonic() + 300
        while not torch_mapped(pid) or "torch: 1 thread(s) per task slot" not in node.log():
            assert node.proc.poll() is None, f"serve exited with {node.proc.returncode}:\n{node.log()}"
            assert time.monotonic() < deadline, f"the warm-up did not load torch within 300 s:\n{node.log()}"
            time.sleep(0.25)
        assert echo_ok(node.port)
        log = node.log()
        assert log.index("listening as") < log.index("torch: 1 thread(s) per task slot")
    finally:
        node.stop()
    assert node.proc.returncode == 0, node.log()


def test_auto_threads_are_the_usable_cores_shared_by_the_task_slots() -> None:
    cores = usable_cores()
    assert threads_per_slot(0, 1) == cores
    assert threads_per_slot(0, 2) == max(1, cores // 2)
    assert threads_per_slot(0, 10 * cores) == 1  # never zero
    assert threads_per_slot(3, 2) == 3  # a count from the settings is used as given


# What a worker process does when it starts (``run_worker``'s ``build_and_warm``; the embedded worker
# likewise): a Runtime with its thread budget warms the stages it consumes; torch arrives with them.
_WORKER_START = """
import json, sys
from dicomnode.config import Settings
from dicomnode.index.studies import Index
from dicomnode.runtime.runner import Runtime, threads_per_slot
settings = Settings().replace(data_dir=sys.argv[1], torch_threads=int(sys.argv[2]))
runtime = Runtime(settings, Index(settings.index_url), send=lambda version_id, stage: None,
                  threads=threads_per_slot(settings.torch_threads, int(sys.argv[3])))
before = "torch" in sys.modules
runtime.warm(("gpu",))
torch = sys.modules["torch"]
print(json.dumps({"torch_before_warm": before, "intra": torch.get_num_threads(),
                  "interop": torch.get_num_interop_threads()}))
"""


@pytest.mark.parametrize(("setting", "slots"), [(1, 1), (0, 2)])
def test_a_worker_sizes_torchs_pools_when_it_warms_its_stages(tmp_path: Path, setting: int, slots: int) -> None:
    out = subprocess.run([sys.executable, "-c", _WORKER_START, str(tmp_path), str(setting), str(slots)], check=False,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = threads_per_slot(setting, slots)
    assert got == {"torch_before_warm": False, "intra": want, "interop": want}
