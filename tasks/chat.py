"""
The one chat format (in the manner of nanochat's render_conversation): how a list of messages
[{"role": "system"|"user"|"assistant", "content": ...}] becomes text. sft.py renders its training examples with
render_segments (the reply segments carry loss); tasks/gsm8k.py and tasks/sft_sets.py build their zero-shot eval
prompts with chat_prompt, the same text up to where the reply starts, so what SFT teaches is what eval asks.

Formats:
  user_assistant  "User: ...\\nAssistant: reply<EOS>\\nUser: ..." (the default; what eval's chat mode scores)
  plain           the turns' bare text, reply after it
  eos_turns       DialoGPT: every turn's bare text closed by EOS
  chat_template   the model's own HF chat template (tok.tok.apply_chat_template), assistant turns found as the
                  difference between the rendering with and without them
"""

from dataio import ConfigError  # dataio, not common: tasks/ stay free of torch (prepare_data imports them)

# the next turn's header, which a user_assistant model writes after its reply and EOS when it runs on
CHAT_STOP = ["User:"]
STOP_STRINGS = {"user_assistant": ["\nUser:"], "plain": ["\n\n"]}


def render_segments(messages, fmt="user_assistant", tok=None):
    """A chat as [(text, is_completion)], with the EOS closing each reply implied by is_completion (the caller adds
    it; eos_turns: after every turn). tok is needed for chat_template only."""
    if fmt == "eos_turns":  # DialoGPT's format: the turns' bare text, each closed by EOS
        return [(m["content"].strip(), m["role"] == "assistant") for m in messages]
    if fmt == "chat_template":
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tok.tok.apply_chat_template(messages[:i + 1], tokenize=False)
            if not full.startswith(prompt) or not prompt.startswith(done):
                raise ConfigError("the model's chat template does not render turns as prefixes; use "
                                  "prompt_format=user_assistant")
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return segments
    segments, pending = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segments += [(pending, False), (" " + m["content"].strip(), True)]
            pending = "\n"
        elif fmt == "plain":
            pending += m["content"]
        else:
            pending += f"{'User' if m['role'] == 'user' else 'System'}: {m['content'].strip()}\n" + (
                "Assistant:" if m["role"] == "user" else "")
    return segments


def prompt_text(head, fmt="user_assistant", tok=None):
    """The text of the turns before a reply (user_assistant and plain), up to where the reply starts."""
    return "".join(t for t, _ in render_segments(head + [{"role": "assistant", "content": ""}], fmt, tok)[:-1])


def chat_prompt(question):
    """The zero-shot eval prompt of one question: the user_assistant prompt sft.py trains, "User: q\\nAssistant:"."""
    return prompt_text([{"role": "user", "content": question}])


def stop_strings(fmt):
    return STOP_STRINGS.get(fmt, [])
