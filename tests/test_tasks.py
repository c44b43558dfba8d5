"""tasks/: the Task interface (examples, prompt, stop, evaluate, reward) of GSM8K, SVAMP, the synthetic set and
the probes, on real GSM8K/SVAMP rows and hand-written completions."""
import pytest

import tasks
from conftest import shared_path
from tasks import cut_at_stop, gsm8k, probes, synthetic


def test_gsm8k_task_prompts_scores_and_rewards():
    test_path = shared_path("gsm8k", "test.jsonl")
    task = tasks.get_task("gsm8k", test_path=test_path, train_path=shared_path("gsm8k", "train.jsonl"))
    data = task.examples("test")
    assert len(data) == 1319 and len(task.examples("train")) == 7473
    janet = data[0]
    assert janet["id"] == 0 and janet["gold"] == "18" and janet["question"].startswith("Janet")

    # chat format (sft.py's) without exemplars, GSM8K's k-shot format with them
    assert task.prompt(janet) == f"User: {janet['question']}\nAssistant:" and task.stop() == ["User:"]
    shots = gsm8k.fewshot_exemplars(2, seed=1234, near=(test_path,))  # train.jsonl found beside the test file
    assert shots == gsm8k.fewshot_exemplars(2, seed=1234, near=(test_path,))
    assert shots != gsm8k.fewshot_exemplars(2, seed=1, near=(test_path,))
    prompt = task.prompt(janet, shots)
    assert prompt.startswith(f"Question: {shots[0]['question']}\nAnswer: {shots[0]['answer']}\n\nQuestion: ")
    assert prompt.endswith(f"\n\nQuestion: {janet['question']}\nAnswer:") and prompt.count("Question:") == 3
    assert task.stop(shots) == ["\n\n", "Question:"]

    # a completion cut at the format's stop string, then scored strict (after ####) and flexible (last number)
    completion = cut_at_stop(" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18\n\nQuestion: next", task.stop(shots))
    assert completion == " 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18"
    cases = [  # completion, strict, flexible, reward
        (completion, True, True, 1.0),
        (" She makes $18.00 a day.", False, True, 0.0),   # no '####': flexible only, no reward
        (" #### 18\nor maybe 20", True, False, 1.0),      # the reward reads the answer line, as strict does
        (" #### 17", False, False, 0.0),
        (" I do not know.", False, False, 0.0),
    ]
    for text, strict, flexible, reward in cases:
        result = task.evaluate(janet, text)
        assert result["correct"] == {"strict": strict, "flexible": flexible}, text
        assert task.reward(janet, text) == reward, text
    assert task.evaluate(janet, " I do not know.")["extracted"] == {"strict": None, "flexible": None}


def test_svamp_rows_and_scoring():
    task = tasks.get_task("svamp", test_path=shared_path("svamp", "SVAMP.json"))
    data = task.examples()
    assert len(data) == 1000 and len({d["id"] for d in data}) == 1000
    dvds, candy = data[0], data[1]
    assert dvds["id"] == "chal-1" and dvds["gold"] == "51"  # Answer 51.0 in the file
    assert dvds["question"] == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
                                "How much do you have to pay to buy each pack?")
    assert candy["gold"] == "1"
    assert task.prompt(dvds) == f"User: {dvds['question']}\nAssistant:"
    assert task.reward(dvds, " 76 - 25 = 51\n#### 51") == 1.0
    assert task.reward(dvds, " 76 + 25 = 101\n#### 101") == 0.0
    assert task.evaluate(candy, " It cost $1.")["correct"] == {"strict": False, "flexible": True}


def test_synthetic_task_is_deterministic_and_scored_like_gsm8k():
    task = tasks.get_task("synthetic", n=40, seed=3)
    test = task.examples("test")
    assert test == synthetic.SyntheticMath(n=40, seed=3).examples("test")      # the same set on every machine
    assert synthetic.SyntheticMath(n=10, seed=3).examples("test") == test[:10]  # prefix-stable
    other_seed = synthetic.SyntheticMath(n=40, seed=4).examples()
    assert sum(a["question"] != b["question"] for a, b in zip(test, other_seed)) > 30
    train_questions = {e["question"] for e in task.examples("train")}
    assert not train_questions & {e["question"] for e in test}  # the splits do not overlap
    with pytest.raises(ValueError):
        task.examples("validation")
    with pytest.raises(ValueError):
        synthetic.SyntheticMath(ops=("pow",))

    for e in test:
        assert e["answer"].endswith(f"\n#### {e['gold']}") and e["gold"] == str(int(e["gold"]))
        assert task.evaluate(e, " " + e["answer"])["correct"] == {"strict": True, "flexible": True}
        assert task.reward(e, " " + e["answer"]) == 1.0  # its own worked solution earns the reward
        assert task.reward(e, f" #### {int(e['gold']) + 1}") == 0.0
    e = test[0]
    assert task.prompt(e) == f"User: {e['question']}\nAssistant:" and task.stop() == gsm8k.CHAT_STOP


def test_probe_task_and_lookup():
    task = tasks.get_task("probes", n=5)
    items = task.examples()
    assert len(items) == 144 + 3 * 5 and items == probes.Probes(n=5).examples()
    item = next(it for it in items if it["suite"] == "mul_2d_1d")
    a, b = item["question"].split("*")
    assert task.prompt(item) == item["prompt"] and task.stop() == ["\n"]
    answer = cut_at_stop(f" {a}*{b}={int(a) * int(b)}\nQ: 1 * 1", task.stop())
    assert task.evaluate(item, answer) == {"suite": "mul_2d_1d", "extracted": str(int(a) * int(b)), "correct": True}
    assert task.reward(item, answer) == 1.0 and task.reward(item, f" {a}*{b}={int(a) * int(b) + 10}") == 0.0
    assert set(tasks.TASKS) == {"gsm8k", "svamp", "synthetic", "probes", "arithmetic"}
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("mmlu")
