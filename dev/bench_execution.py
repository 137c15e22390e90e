"""
Per-call cost of running model-written code: HumanEval.evaluate on the canonical solutions (what chat_eval
pays per problem) and a bare execute_code("pass"), one call at a time, inside bubblewrap and under the guard
alone. Prints the median wall-clock seconds per call and the CPU seconds its processes used (user + system,
the figure to compare on a loaded machine).

    NANOCHAT_DATA=embedded python -m dev.bench_execution                 # 40 problems, 40 bare calls, per layer
    NANOCHAT_DATA=embedded python -m dev.bench_execution --problems 164
"""

import argparse
import os
import resource
import statistics
import time

from nanochat import execution
from tasks.humaneval import HumanEval


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timings(fn, count):
    """-> (wall-clock seconds of each call, CPU seconds of all the calls' processes together)"""
    seconds, cpu = [], children_cpu()
    for i in range(count):
        start = time.perf_counter()
        assert fn(i), f"call {i} failed"
        seconds.append(time.perf_counter() - start)
    return seconds, children_cpu() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=40, help="HumanEval problems (and bare calls) per layer")
    args = parser.parse_args()
    task = HumanEval()
    examples = [task[i] for i in range(args.problems)]
    layers = ["bwrap", "guard"] if execution.bubblewrap_works() else ["guard"]
    for layer in layers:
        os.environ["NANOCHAT_NO_BWRAP"] = "1" if layer == "guard" else "0"
        for name, fn in [("execute_code('pass')", lambda i: execute_bare()),
                         ("HumanEval.evaluate", lambda i: task.evaluate(examples[i], examples[i]["messages"][1]["content"]))]:
            seconds, cpu = timings(fn, args.problems)
            cpu = f"{cpu / len(seconds):.3f} s CPU" if layer == "guard" else "CPU n/a (bwrap hides its children's)"
            print(f"{layer:5s}  {name:22s}  median {statistics.median(seconds):.3f} s wall, {cpu} per call ({len(seconds)} calls)")


def execute_bare():
    return execution.execute_code("pass").success


if __name__ == "__main__":
    main()
