"""
HumanEval: 164 Python functions to complete from a signature and docstring, graded by running the
data set's unit tests against the model's function: the function runs in one contained process, the tests
in another that only calls it, so the model's code cannot forge the verdict (nanochat/execution.py).
Local file chat/humaneval/HumanEval.jsonl.gz, else the hub's openai/openai_humaneval.
"""

import re

from nanochat.execution import execute_code
from nanochat.datasource import load_hub_dataset
from tasks.common import Task, local_file, read_jsonl

# the first fenced block; a missing closing fence (a completion cut at max_tokens) still counts
CODE_BLOCK_RE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion):
    """The code of a completion: the first ``` block when there is one, else the whole completion."""
    match = CODE_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


def program_and_tests(conversation, completion):
    """
    -> (the program: the prompt then the model's code, the tests: the prompt then the data set's check).
    The prompt first keeps its imports and helper functions (the tests use some), and works whether the
    model continued the body (the code extends the prompt's function) or rewrote the whole function (a
    later def replaces the docstring-only one).
    """
    prompt = conversation["prompt"]
    return "\n".join([prompt, extract_code(completion), ""]), "\n".join([prompt, conversation["test"], ""])


class HumanEval(Task):

    def __init__(self, data_dir=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        path = local_file("chat", "humaneval", "HumanEval.jsonl.gz", data_dir=data_dir)
        self.rows = read_jsonl(path) if path else load_hub_dataset("openai/openai_humaneval", split="test")

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
        ]
        return {"messages": messages, "prompt": row["prompt"], "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, assistant_response):
        program, tests = program_and_tests(conversation, assistant_response)
        return execute_code(program, timeout=self.timeout, tests=tests, entry_point=conversation["entry_point"]).success
