"""Your own data (tasks/customjson.py): conversations for chat_sft --data and question/answer pairs for chat_rl --task,
read line by line, every bad line named with its file and number, and answers graded as the docs say."""
import gzip
import json

import pytest

from tasks.customjson import CustomJSON, CustomQA, parse_data_spec


def write_lines(path, lines, raw=False):
    path.write_bytes(b"".join(line if raw else (line + "\n").encode() for line in lines))
    return str(path)


CONVERSATION = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])


def test_data_spec_takes_an_optional_number_of_passes():
    assert parse_data_spec("chats.jsonl") == ("chats.jsonl", 1)
    assert parse_data_spec("chats.jsonl:3") == ("chats.jsonl", 3)
    assert parse_data_spec("my:dir/chats.jsonl") == ("my:dir/chats.jsonl", 1)  # a ':' in the path is not a count
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_data_spec("chats.jsonl:0")


@pytest.mark.parametrize("bad, problem", [
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "at least 2 messages"),
    ('[{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]', "should have role 'user'"),
    ("[{\"role\": \"user\", \"content\": 3}, {\"role\": \"assistant\", \"content\": \"x\"}]", "content must be a string"),
    ("not json at all", "Expecting value"),
])
def test_a_bad_conversation_names_its_file_and_line(tmp_path, bad, problem):
    path = write_lines(tmp_path / "chats.jsonl", [CONVERSATION, "", bad, CONVERSATION])
    with pytest.raises(ValueError, match=rf"chats.jsonl line 3: .*{problem}"):
        CustomJSON(filepath=path)


def test_undecodable_or_damaged_files_are_named(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [CONVERSATION.encode() + b"\n", b"\xff\xfe bad bytes\n"], raw=True)
    with pytest.raises(ValueError, match="chats.jsonl line 2: not UTF-8 text"):
        CustomJSON(filepath=path)
    gz = tmp_path / "chats.jsonl.gz"
    gz.write_bytes(gzip.compress(((CONVERSATION + "\n") * 50).encode())[:40])  # cut short
    with pytest.raises(ValueError, match="chats.jsonl.gz: cannot be read"):
        CustomJSON(filepath=str(gz))
    with pytest.raises(ValueError, match="no conversations"):
        CustomJSON(filepath=write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    good = CustomJSON(filepath=write_lines(tmp_path / "good.jsonl", [CONVERSATION] * 3))
    assert len(good) == 3 and good[2]["messages"][1]["content"] == "Hello!"


def qa_task(tmp_path, rows):
    return CustomQA(filepath=write_lines(tmp_path / "qa.jsonl", [json.dumps(row) for row in rows]))


def test_numeric_answers_are_graded_by_the_last_number_in_the_reply(tmp_path):
    task = qa_task(tmp_path, [{"question": "What is 12 times 7?", "answer": 84},
                              {"question": "Population?", "answer": "1,234,567"},
                              {"question": "Temperature?", "answer": "-2.5"}])
    times, population, temperature = task[0], task[1], task[2]
    assert times["messages"] == [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "84"}]
    assert task.evaluate(times, "12 times 7 is 84.")
    assert task.evaluate(times, "84.0")
    assert not task.evaluate(times, "84 is close, but the answer is 85")  # the last number counts
    assert not task.evaluate(times, "eighty-four")
    assert task.evaluate(population, "About 1234567 people")
    assert task.evaluate(temperature, "It was -2.5 degrees")
    assert not task.evaluate(temperature, "It was 2.5 degrees")
    assert (task.reward(times, "84"), task.reward(times, "83")) == (1.0, 0.0)


def test_text_answers_are_graded_by_exact_match_ignoring_case_space_and_final_period(tmp_path):
    task = qa_task(tmp_path, [{"question": "Capital of France?", "answer": "Paris"}])
    assert task.evaluate(task[0], "  paris. ")
    assert not task.evaluate(task[0], "It is Paris")
    assert not task.evaluate(task[0], "Lyon")


@pytest.mark.parametrize("bad", ['{"question": "Q?"}', '{"question": "", "answer": "A"}', '{"question": "Q?", "answer": true}',
                                 '["Q?", "A"]', '{"question": "Q?", "answer": [1]}', "{broken"])
def test_a_bad_question_line_names_its_file_and_line(tmp_path, bad):
    path = write_lines(tmp_path / "qa.jsonl", ['{"question": "Q?", "answer": "A"}', bad])
    with pytest.raises(ValueError, match=r"qa.jsonl line 2: "):
        CustomQA(filepath=path)


def test_missing_files_say_what_to_write(tmp_path):
    with pytest.raises(FileNotFoundError, match='"question"'):
        CustomQA(filepath=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="one JSON list of messages per line"):
        CustomJSON(filepath=str(tmp_path / "nope.jsonl"))
