"""A tiny HF causal LM trained with common's FSDP2 helpers, under torchrun (gloo on CPU) or as one plain process:
tests/test_fsdp.py compares the two. Usage: python fsdp_worker.py ARCH STEPS OUT_JSON [save=STEP] [resume=PATH]"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import torch  # noqa: E402


def tiny_model(arch):
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mixtral": MixtralConfig}[arch](**shape)
    if arch == "mixtral":
        config.num_local_experts, config.num_experts_per_tok = 4, 2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def batch(step, rank, world_size, rows=8, length=16):
    """The step's global batch (the same whatever the world size); this rank's rows of it."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 64, (rows, 1), generator=g)
    x = (start + torch.arange(length)) % 64  # counting sequences: something to learn
    return x[rank::world_size]


def main():
    arch, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    opts = dict(a.split("=", 1) for a in sys.argv[4:])
    d = common.setup_dist("cpu")
    model = tiny_model(arch)
    if d.ddp:
        common.shard_model(model, d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = 0
    if "resume" in opts:
        common.load_sharded_checkpoint(opts["resume"], model, optimizer, d.rank)
        start = common.load_checkpoint(opts["resume"])["step"] + 1
    losses = {}
    for step in range(start, steps):
        x = batch(step, d.rank, d.world_size)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = common.all_reduce(loss.detach().clone(), "avg", d).item()
        if step == int(opts.get("save", -1)):
            common.save_sharded_checkpoint(os.path.dirname(out), step, model, optimizer,
                                           {"kind": "fsdp_test", "config": {}, "identity": {}}, d)
    if d.master:
        with open(out, "w") as f:
            json.dump(losses, f)
    common.barrier(d)  # no rank tears its connections down while the other still talks to it
    common.cleanup_dist(d)
    # skip the interpreter's teardown: on this CPU build gloo's threads sometimes abort it ("terminate called
    # without an active exception", seen 2 in ~10 runs) after all the work above is done and written
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
