"""
The one interface the stages ask of a task (in the manner of nanochat's tasks/common.py): eval_gsm8k.py,
sft.py and grpo.py get data, prompts and scores from the same object, so a reward means what eval means.

    task.examples(split)                 -> [{"id", "question", ..., "gold"}, ...]
    task.prompt(example, exemplars=())   -> the text the model continues (few-shot with exemplars, else chat)
    task.stop(exemplars=())              -> the stop strings of that prompt format
    task.evaluate(example, completion)   -> {"extracted": ..., "correct": ...}
    task.reward(example, completion)     -> float in [0, 1], the RL reward
"""


class Task:
    name = "task"

    def examples(self, split="test"):
        raise NotImplementedError

    def prompt(self, example, exemplars=()):
        raise NotImplementedError

    def stop(self, exemplars=()):
        raise NotImplementedError

    def evaluate(self, example, completion):
        raise NotImplementedError

    def reward(self, example, completion):
        raise NotImplementedError


def cut_at_stop(text, stop):
    """The completion up to the first stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
