"""Answer extraction for GSM8K-style math on the kinds of output real models write."""

from __future__ import annotations

import pytest

from rad_ds.eval.answers import extract_answer, is_correct, normalize_number, reference_answer

# (model output, extracted answer)
OUTPUTS = [
    # GSM8K's own format (a model fine-tuned on GSM8K solutions)
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
     "in April and May.\n#### 72", "72"),
    ("She eats 3 + 4 = 7 eggs.\nShe sells 16 - 7 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    # chain-of-thought with the answer phrase (Wei et al. exemplars, our instruction)
    ("Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8.", "8"),
    ("The answer is $1,250.", "1250"),
    ("So the total cost is 12 * $4.50 = $54.00.\nThe answer is $54.00", "54"),
    ("The answer is 42.0", "42"),
    ("The final answer is 7.5 hours.", "7.5"),
    ("Therefore, the answer is: 360", "360"),
    ("**Final Answer:** 28,080", "28080"),
    ("Answer: 15 apples", "15"),
    ("The answer is **64**.", "64"),
    ("The answer is 3/4 of the pie.", "0.75"),
    ("The answer is -12.", "-12"),
    ("The answer is 50%", "50"),
    ("The answer is 18. Let me double-check: 9 + 9 = 18. Yes.", "18"),
    ("First guess: the answer is 10. Wait, I forgot the tax. So the answer is 11.", "11"),
    # LaTeX-style (math-tuned models)
    ("Thus she earns $\\boxed{2340}$ per month.", "2340"),
    ("Final Answer: The final answer is $\\boxed{18}$. I hope it is correct.", "18"),
    ("\\[ 5 \\times 12 = 60 \\] so the answer is \\(60\\).", "60"),
    # no phrase: the last number
    ("He has 5 + 4 = 9 toys now.", "9"),
    ("He ran 3-4 miles a day, so in a week about 28 miles", "28"),
    ("The temperature dropped to -5 degrees.", "-5"),
    ("It costs $0.50 per pound and .25 of a pound is needed, so .125", "0.125"),
    # nothing to extract
    ("I'm not sure how to solve this problem.", None),
    ("", None),
]


@pytest.mark.parametrize("output,expected", OUTPUTS, ids=[f"out{i}" for i in range(len(OUTPUTS))])
def test_extract_answer(output, expected):
    assert extract_answer(output) == expected


@pytest.mark.parametrize("text,expected", [
    ("$1,234.50", "1234.5"), ("42.00", "42"), ("-0.0", "0"), ("007", "7"), ("1,000,000", "1000000"),
    ("3/4", "0.75"), ("7/0", None), ("−3", "-3"), ("abc", None), ("12%", "12"), ("€5", "5"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_reference_and_exact_match():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    assert reference_answer(ref) == "18"
    assert reference_answer("1,200") == "1200" and reference_answer(56) == "56"
    assert is_correct("The answer is 18.", ref)
    assert is_correct("so $18.00 in total. The answer is $18.00", ref)
    assert not is_correct("The answer is 17.99.", ref)
    assert not is_correct("I do not know", ref)
    assert is_correct("#### 1,200", "#### 1200") and is_correct("The answer is 0.5", "#### 1/2")


def test_digits_inside_words_are_not_numbers():
    assert extract_answer("w25 w61 w275") is None
    assert extract_answer("Water is H2O and the answer is 4.") == "4"
    assert extract_answer("In Q3 the firm sold 120 units") == "120"
