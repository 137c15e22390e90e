"""
The attack table of dev/LOG.md: the attacks of tests/test_execution_attacks.py run as real calls against the
nanochat on the import path, in each layer, printing for each whether the promise held. Another tree (main,
say) is attacked by putting it first on the path; the attacks are read from this tree's test file, so both
face the same corpus. Left out: the attacks that would harm the machine where nothing stops them (renicing
every process of the user), and those that need this tree's API (the judge's view, the kernel layer alone).

    NANOCHAT_DATA=embedded python -m dev.sandbox_attacks
    NANOCHAT_DATA=embedded PYTHONPATH=/path/to/main python dev/sandbox_attacks.py
"""

import ast
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "test_execution_attacks.py"


def corpus():
    """The attack tables of the test file (constants, and sums of them), read without importing it (it needs this
    tree's API)."""
    tables = {}
    for node in ast.parse(CORPUS.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            try:
                tables[node.targets[0].id] = eval(compile(ast.Expression(node.value), str(CORPUS), "eval"), {"__builtins__": {}}, tables)
            except (NameError, AttributeError):
                pass  # computed by a function: not a table
    return tables


def caller_held(code, env=None):
    """Run code from a caller process of its own; -> whether the caller lived, unchanged, and the code failed."""
    t = corpus()
    run = subprocess.run([sys.executable, "-c", t["CALLER"]], input=code, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})}, start_new_session=True)
    if run.returncode != 0:
        return False, f"caller died ({run.returncode})"
    report = json.loads(run.stdout.splitlines()[-1])
    return not report["success"] and report["unchanged"], report["error"] or report["stdout"]


def attacks():
    """-> [(name, function returning (held, detail))]"""
    from nanochat.execution import execute_code
    from tasks.humaneval import HumanEval
    t = corpus()
    task = HumanEval()
    forged = json.dumps({"passed": True, "error": None, "memory": False}).encode()
    rows = []
    for name, attack in t["FORGERIES"].items():
        completion = t["WRONG"] + f"FORGED = {forged!r}\n" + textwrap.dedent(attack)
        rows.append((f"forge: {name}", lambda c=completion: (not any(task.evaluate(task[0], c) for _ in range(3)), "")))
    for name, payload in t["REPORTS"].items():
        code = t["WRITE_EVERYWHERE"].format(payload=payload)

        def report(code=code):
            try:
                return not execute_code(code + "assert False\n").success and not task.evaluate(task[0], t["WRONG"] + code), ""
            except Exception as e:
                return False, f"caller raised {type(e).__name__}"
        rows.append((f"report: {name}", report))

    def writable():
        places = ["/dev/shm", "/dev", "/tmp", "/var/tmp", os.path.expanduser("~")]
        code = t["DEFEAT_GUARD"] + "import uuid\n" + "".join(
            f"try:\n    path = '{place}/nanochat_attack_' + uuid.uuid4().hex\n    open(path, 'wb').write(bytes(2**20))\n"
            f"    print(path)\nexcept OSError:\n    pass\n" for place in places)
        written = execute_code(code).stdout.split()  # on the host, or on a tmpfs of the sandbox's: memory all the same
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        return not written, " ".join(written)
    rows.append(("write outside the temp dir (guard defeated)", writable))

    def shm():
        victim = tempfile.mkstemp(dir="/dev/shm", prefix="nanochat_victim_")[1]
        execute_code(t["DEFEAT_GUARD"] + f"os.remove({victim!r})")
        held = os.path.exists(victim)
        if held:
            os.remove(victim)
        return held, ""
    rows.append(("delete another program's /dev/shm file", shm))
    for name, code in t["CODE_OBJECT_ATTACKS"].items():
        rows.append((f"raw memory: {name}", lambda code=code: (not execute_code(code + "\nprint('reached the end')").success, "")))
    for name, code in t["CALLER_ATTACKS"].items():
        if name != "renice_user":
            rows.append((f"caller: {name}", lambda code=code: caller_held(t["REIMPORTED"] + code + "\nprint('done')")))

    def environ():
        secret = "nanochat-secret-" + os.urandom(8).hex()
        held, detail = caller_held(f"SECRET = {secret.encode()!r}\n" + t["READ_ENVIRONMENTS"], {"NANOCHAT_TEST_SECRET": secret})
        return detail != "True\n", detail
    rows.append(("caller: read its environment", environ))

    def network():
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(1)
            execute_code(f"PORT = {server.getsockname()[1]}\n" + t["CONNECT"])
            try:
                server.accept()[0].close()
                return False, "connected"
            except socket.timeout:
                return True, ""
    rows.append(("network to a loopback listener", network))

    def deep():
        try:
            execute_code(t["DEEP_TREE"], timeout=30.0)
            return True, ""
        except Exception as e:
            return False, f"caller raised {type(e).__name__}"
    rows.append(("a tree too deep for the caller's rmtree", deep))
    return rows


def main():
    sys.path.insert(0, os.getcwd())
    import nanochat.execution as execution
    print(f"attacking {Path(execution.__file__).parents[1]}")
    layers = ["bwrap", "guard"] if execution.bubblewrap_works() else ["guard"]
    results = {}
    for layer in layers:
        os.environ["NANOCHAT_NO_BWRAP"] = "1" if layer == "guard" else "0"
        for name, attack in attacks():
            held, detail = attack()
            results.setdefault(name, {})[layer] = "held" if held else f"BROKEN {detail}".replace("\n", " ").strip()[:60]
    print("| attack | " + " | ".join(layers) + " |\n|---|" + "---|" * len(layers))
    for name, outcome in results.items():
        print(f"| {name} | " + " | ".join(outcome[layer] for layer in layers) + " |")


if __name__ == "__main__":
    main()
