"""The one chat format: the eval prompt of a question is the prefix of its SFT example, and the stop is SFT's."""

from tasks import chat, gsm8k
from tasks.gsm8k import GSM8K  # noqa: F401  (the task class eval_gsm8k uses)


def test_eval_prompt_is_prefix_of_sft_example():
    question, reply = "What is 2+3?", "2+3=5. #### 5"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    segments = chat.render_segments(messages)
    assert [is_reply for _, is_reply in segments] == [False, True]
    sft_text = "".join(t for t, _ in segments)
    prompt = gsm8k.build_prompt(question, [])
    assert prompt == "User: What is 2+3?\nAssistant:" == chat.chat_prompt(question)
    assert sft_text.startswith(prompt) and sft_text[len(prompt):] == " " + reply
    # a second turn: what SFT teaches after a reply (and its EOS) is the next header, which eval stops at
    two = messages + [{"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]
    after_reply = chat.render_segments(two)[2][0]
    assert after_reply.startswith(chat.stop_strings("user_assistant")[0])
    assert any(after_reply.lstrip("\n").startswith(s) for s in gsm8k.CHAT_STOP)
    assert chat.prompt_text(two[:3]) == sft_text + after_reply
