"""The mul_tokens condition's tokenizer: only the facts change, the rule for what is a fact, and the
exported HF tokenizer agreeing with it (issue 9, items 2 and 14)."""
import json

import pytest

import common
import dataio
from conftest import shared_path
from tasks import synthetic

ISSUE_SENTENCE = "She buys 7 x 8 = 56 apples"


@pytest.fixture(scope="module", params=["gpt2", "byte"])
def toks(request):
    """(mul tokenizer, baseline tokenizer, HF twin of the mul tokenizer) for each tokenizer kind."""
    ranks = shared_path("tokenizers", "gpt2.tiktoken") if request.param == "gpt2" else None
    tok = dataio.Tokenizer(request.param, mul_range=(1, 12), tokenizer_file=ranks)
    return tok, dataio.Tokenizer(request.param, tokenizer_file=ranks), dataio.build_hf_tokenizer(tok)


def real_text():
    with open(shared_path("gsm8k", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:400]
    docs = [r["question"] + "\n" + r["answer"] for r in rows] + synthetic.synthetic_math_text(200, seed=3)
    return "\n\n".join(docs) + "\n" + ISSUE_SENTENCE + ", 3 times 4 is 12 and  6*7=42\t2 × 3 = 6."


def fact_spans(tok, text):
    """Byte spans of the facts that become tokens, each with the space before it when there is one."""
    lo, hi = tok.mul_range
    spans = []
    for m in dataio.MUL_RE.finditer(text):
        a, b, c = int(m[1]), int(m[2]), int(m[3])
        if lo <= a <= hi and lo <= b <= hi and a * b == c:
            start = m.start() - (m.start() > 0 and text[m.start() - 1] == " ")
            spans.append((len(text[:start].encode()), len(text[:m.end()].encode())))
    return spans


def test_only_the_facts_change(toks):
    """Outside the fact spans, the mul condition's tokens are exactly the baseline's (no stray space token)."""
    tok, base, _ = toks
    text = real_text()
    spans = fact_spans(tok, text)
    assert len(spans) > 100
    ids = tok.encode(text)
    facts = [i for i in ids if i >= tok.mul_first]
    assert len(facts) == len(spans)
    # a fact after a space takes the spaced token, which decodes to ' a*b=c'
    assert [tok.decode([i]).startswith(" ") for i in facts] == [text.encode()[s:s + 1] == b" " for s, _ in spans]
    assert sum(tok.decode([i]).startswith(" ") for i in facts) >= 5
    # the baseline's tokens with their byte offsets: each one lies wholly inside or wholly outside a fact span
    outside, pos, k = [], 0, 0
    for i in base.encode(text):
        n = len(base.base.decode_single_token_bytes(i)) if base.kind == "gpt2" else 1
        while k < len(spans) and spans[k][1] <= pos:
            k += 1
        inside = k < len(spans) and spans[k][0] <= pos < spans[k][1]
        if inside:
            assert pos + n <= spans[k][1], "a baseline token straddles the end of a fact span"
        else:
            assert k >= len(spans) or pos + n <= spans[k][0], "a baseline token straddles the start of a fact span"
            outside.append(i)
        pos += n
    assert [i for i in ids if i < tok.mul_first] == outside
    assert tok.decode(tok.encode(ISSUE_SENTENCE)) == "She buys 7*8=56 apples"
    apples = base.encode(" apples")
    assert tok.encode(ISSUE_SENTENCE)[-len(apples) - 1:] == [tok.mul_space_ids[(7, 8)], *apples]


# text -> the facts it holds (as their tokens decode); everything else stays text
EDGE_CASES = [
    ("3*4=12", ["3*4=12"]), ("3x4=12", ["3*4=12"]), ("3×4=12", ["3*4=12"]),
    ("3 x 4 = 12", ["3*4=12"]), ("3 × 4 = 12", ["3*4=12"]), ("3 times 4 is 12", ["3*4=12"]),
    ("3 *4= 12", ["3*4=12"]), ("so 3*4=12.", [" 3*4=12"]), ("(3*4=12)", ["3*4=12"]),
    ("<<3*4=12>>12", ["3*4=12"]), ("a  3*4=12", [" 3*4=12"]), ("\t3*4=12", ["3*4=12"]),
    ("3*4=12, 5*5=25", ["3*4=12", " 5*5=25"]), ("box 3 x 4 = 12", [" 3*4=12"]), ("a\n\n3*4=12", ["3*4=12"]),
    ("a \n\t3*4=12\n\n", ["3*4=12"]),
    # not complete, correct, stand-alone products of ASCII digits on one line
    ("2*3*4=12", []), ("-3*4=12", []), ("3*4=12-1", []), ("３*４=１２", []), ("3*４=12", []), ("١3*4=12", []),
    ("3*4=\n12", []), ("3\n*\n4\n=\n12", []), ("a3*4=12", []), ("é3*4=12", []), ("1e3*4=12", []),
    ("3*4=12a", []), ("3*4=12.5", []), ("1.3*4=12", []), ("03*4=12", []), ("3*4=012", []), ("3  *4=12", []),
    ("2 x 3 = 6 x 4 = 24", []), ("2*3=4*5=20", []), ("x 3*4=12", []), ("3*4=12 x 2", []), ("3*4=13", []),
    ("2 times 3 times 4 is 12", []), ("13*4=52", []), ("0*5=0", []),
]


@pytest.mark.parametrize("text,facts", EDGE_CASES)
def test_what_is_a_fact_and_the_hf_tokenizer_agrees(toks, text, facts):
    tok, base, hf = toks
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids if i >= tok.mul_first] == facts
    if not facts:
        assert ids == base.encode(text)
    assert hf.encode(text).ids == ids
    assert hf.decode(ids) == tok.decode(ids)


def test_token_byte_lengths_count_the_space_of_a_spaced_fact(toks):
    """Bits per byte stay right: a spaced fact token stands for the bytes of ' a*b=c'."""
    tok, _, _ = toks
    text = "So 7 x 8 = 56 and (3*4=12) and 12 times 12 is 144."
    ids = tok.encode(text)
    assert tok.mul_space_ids[(7, 8)] in ids and tok.mul_ids[(3, 4)] in ids and tok.mul_space_ids[(12, 12)] in ids
    lengths = common.token_byte_lengths(tok, common.padded_vocab_size(tok.vocab_size))
    assert int(lengths[ids].sum()) == len(tok.decode(ids).encode("utf-8"))
    assert int(lengths[tok.mul_space_ids[(7, 8)]]) == len(" 7*8=56")
