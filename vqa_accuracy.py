"""The standard VQA accuracy of plain-text answers (VQA v2, TextVQA), used by infer.py for text-answer rows.

An answer scores min(#humans who gave it / 3, 1), averaged over the ten leave-one-out subsets of the
ten human answers, after the official answer normalisation (vqaEval.py of the VQA challenge): punctuation,
number words, articles, contractions. Unlike vqaEval.py, which normalises only when the humans disagree,
every answer is normalised here, as EvalAI and lmms-eval do: "Coca Cola." matches "coca cola" always.
"""

import itertools
import re

# Removed when it touches a space or when the text has a comma between digits ("1,000"), else replaced by a space.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# The contractions of the official list; each is also reached from every spelling that drops some of its
# apostrophes ("dont", "couldn'tve", "couldnt've"). Left out, as lowercasing leaves them out of the official
# list too or as they would rewrite common words: he'll, we'll, we're, she'll, it's, I'm, I've, I'd, I'll.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd've isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've""".split()


def _spellings_without_apostrophes(word: str):
    pieces = word.split("'")
    for kept in itertools.product(("", "'"), repeat=len(pieces) - 1):
        yield pieces[0] + "".join(mark + piece for mark, piece in zip(kept, pieces[1:]))


CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _spellings_without_apostrophes(word)}
# vqaEval.py's period pattern "(?!<=\d)(\.)(?!\d)" begins with a lookahead, not the lookbehind it meant: in effect
# a period is removed unless a digit follows it ("2.5" stays, "end." and ".5"'s neighbours follow that rule).
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")


def normalize_answer(answer: str) -> str:
    """The official normalisation: whitespace, punctuation, periods, then lowercase words with number words
    as digits, articles dropped and contractions restored."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    joins_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    stripped = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if touches_space or joins_digits else " ")
    stripped = _PERIOD.sub("", stripped)
    words = [NUMBER_WORDS.get(word, word) for word in stripped.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """min(#humans who gave the answer / 3, 1), averaged over the leave-one-out subsets of the human answers."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in human_answers]
    total = sum(matches)
    # Leaving out answer i leaves total - matches[i] humans who agree with the prediction.
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


def score_text_answers(rows, predictions) -> tuple[list[dict], dict]:
    """predictions.jsonl records and the metrics of text-answer rows. A row's human answers are its "answers"
    (the converter's --task vqa keeps all ten); without them its response stands for ten identical ones
    (exact match after normalisation). A sample whose image failed is kept but left out of the score."""
    records = []
    for row, prediction in zip(rows, predictions):
        answers = row.get("answers") or [row["assistant"]] * 10
        scored = prediction["error"] is None
        records.append(
            {
                "image": row["image"][0],
                "query": row["user"],
                "answer": row["assistant"],
                "answers": answers,
                "raw_output": prediction["raw_output"],
                "vqa_accuracy": vqa_accuracy(prediction["raw_output"], answers) if scored else None,
                "error": prediction["error"],
            }
        )
    accuracies = [record["vqa_accuracy"] for record in records if record["error"] is None]
    metrics = {
        "vqa_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "vqa_num_samples": len(accuracies),
        "vqa_failed_samples": len(records) - len(accuracies),
    }
    return records, metrics
