import json

import pytest

from comflp.asr.scoring import ErrorStats, alignment_text, error_stats, scores_table, write_scores


def test_word_counts_match_hand_alignment():
    refs = ["a b c d", "e f", "h i"]
    hyps = ["a x c", "e f g", "h i"]
    # a=a, b->x, c=c, d deleted | e=e, f=f, g inserted | all correct
    stats = error_stats(refs, hyps, "word")
    assert stats == ErrorStats(snt=3, wrd=8, corr=6, sub=1, dele=1, ins=1, sent_err=2)
    assert stats.err == pytest.approx(37.5)


def test_empty_hypothesis_deletes_every_reference_unit():
    stats = error_stats(["a b", "c"], ["", "c"], "word")
    assert stats == ErrorStats(snt=2, wrd=3, corr=1, sub=0, dele=2, ins=0, sent_err=1)
    assert stats.err == pytest.approx(200 / 3)


def test_empty_reference_counts_insertions():
    stats = error_stats(["", "a"], ["x y", "a"], "word")
    assert stats == ErrorStats(snt=2, wrd=1, corr=1, sub=0, dele=0, ins=2, sent_err=1)
    assert stats.err == pytest.approx(200.0)


def test_empty_reference_and_hypothesis_count_nothing():
    stats = error_stats(["", "a b"], ["", "a b"], "char")
    assert stats == ErrorStats(snt=2, wrd=3, corr=3, sub=0, dele=0, ins=0, sent_err=0)


@pytest.mark.parametrize("unit", ["word", "char"])
def test_all_empty_references(unit):
    assert error_stats(["", " "], ["", ""], unit) == ErrorStats(2, 0, 0, 0, 0, 0, 0)
    assert error_stats(["", " "], ["", ""], unit).err == 0.0
    stats = error_stats(["", ""], ["ab", ""], unit)
    assert stats.wrd == 0 and stats.sent_err == 1
    assert stats.ins == (1 if unit == "word" else 2)
    assert stats.err == pytest.approx(100.0 * stats.ins)


def test_no_sentences():
    assert error_stats([], [], "word") == ErrorStats(0, 0, 0, 0, 0, 0, 0)


def test_mandarin_cer_without_spaces():
    # 今天天 correct, 气 deleted, 很好 correct, 啊 inserted: 2 errors in 6 characters
    stats = error_stats(["今天天气很好"], ["今天天很好啊"], "char")
    assert stats == ErrorStats(snt=1, wrd=6, corr=5, sub=0, dele=1, ins=1, sent_err=1)
    assert stats.err == pytest.approx(100 / 3)
    # as words, each sentence is a single unit
    assert error_stats(["今天天气很好"], ["今天天很好啊"], "word").sub == 1


def test_english_cer_counts_spaces_and_normalises_whitespace():
    # "ab cd" has 5 characters (the space included); "c" is deleted
    stats = error_stats(["ab  cd "], [" ab d"], "char")
    assert stats == ErrorStats(snt=1, wrd=5, corr=4, sub=0, dele=1, ins=0, sent_err=1)
    assert stats.err == pytest.approx(20.0)


def test_character_repeats_are_distinct_positions():
    stats = error_stats(["aaa", "ab"], ["aa", "ba"], "char")
    # aaa -> aa: one deletion; ab -> ba: two edits (substitutions or a deletion + insertion)
    assert stats.snt == 2 and stats.wrd == 5 and stats.sent_err == 2
    assert stats.sub + stats.dele + stats.ins == 3
    assert stats.corr + stats.sub + stats.dele == stats.wrd


def test_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_stats(["a", "b"], ["a"], "word")
    with pytest.raises(ValueError, match="unit"):
        error_stats(["a"], ["a"], "phone")


def test_scores_table():
    table = scores_table(
        [
            ("test", ErrorStats(snt=3, wrd=8, corr=6, sub=1, dele=1, ins=1, sent_err=2)),
            ("empty", ErrorStats(snt=2, wrd=0, corr=0, sub=0, dele=0, ins=1, sent_err=1)),
        ]
    )
    assert table.splitlines() == [
        "| dataset | Snt | Wrd | Corr | Sub | Del | Ins | Err | S.Err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| test | 3 | 8 | 75.0 | 12.5 | 12.5 | 12.5 | 37.5 | 66.7 |",
        "| empty | 2 | 0 | 0.0 | 0.0 | 0.0 | 100.0 | 100.0 | 50.0 |",
    ]


def test_scores_table_of_error_stats_sums_to_err():
    stats = error_stats(["a b c", "d e"], ["a c c x", "e"], "word")
    row = scores_table([("dev", stats)]).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    corr, sub, dele, ins, err = map(float, cells[3:8])
    assert corr + sub + dele == pytest.approx(100.0, abs=0.15)
    assert sub + dele + ins == pytest.approx(err, abs=0.15)
    assert err == pytest.approx(round(stats.err, 1))


def test_alignment_text_words():
    text = alignment_text([{"id": "u1", "ref": "a bb c d", "hyp": "a x c"}], "word")
    assert text == "id: u1\nref: a bb c d\nhyp: a x  c *\nop:  C S  C D\nC=2 S=1 D=1 I=0\n"


def test_alignment_text_wide_characters_and_several_utterances():
    utts = [
        {"id": "zh", "ref": "你好", "hyp": "你好吗"},
        {"id": "en", "ref": "a b", "hyp": "ab"},
        {"id": "silent", "ref": "", "hyp": ""},
    ]
    blocks = alignment_text(utts, "char").split("\n\n")
    assert blocks[0] == "id: zh\nref: 你 好 **\nhyp: 你 好 吗\nop:  C  C  I\nC=2 S=0 D=0 I=1"
    assert blocks[1] == "id: en\nref: a <sp> b\nhyp: a **** b\nop:  C D    C\nC=2 S=0 D=1 I=0"
    assert blocks[2] == "id: silent\nref:\nhyp:\nop:\nC=0 S=0 D=0 I=0\n"


def test_write_scores(tmp_path):
    utts = [
        {"id": "u1", "ref": "a b c", "hyp": "a b"},
        {"id": "u2", "ref": "d e", "hyp": ""},
    ]
    stats = write_scores(
        tmp_path / "out", "test_clean", utts, info={"method": "greedy", "rtf": 0.1}
    )
    out = tmp_path / "out"
    assert stats["wer"] == error_stats(["a b c", "d e"], ["a b", ""], "word")
    assert stats["cer"] == error_stats(["a b c", "d e"], ["a b", ""], "char")
    assert (out / "hyp.txt").read_text() == "u1 a b\nu2\n"
    assert (out / "ref.txt").read_text() == "u1 a b c\nu2 d e\n"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["name"] == "test_clean" and scores["method"] == "greedy" and scores["rtf"] == 0.1
    assert scores["wer"] == stats["wer"].to_dict()
    assert scores["wer"]["err"] == pytest.approx(60.0)  # 3 deletions in 5 words
    assert scores["cer"]["err"] == pytest.approx(100 * 5 / 8)  # " c" and "d e" deleted
    result = (out / "result.md").read_text()
    assert "## WER" in result and "## CER" in result
    assert "| test_clean | 2 | 5 | 40.0 | 0.0 | 60.0 | 0.0 | 60.0 | 100.0 |" in result
    assert (out / "alignment.word.txt").read_text() == alignment_text(utts, "word")
    assert (out / "alignment.char.txt").read_text() == alignment_text(utts, "char")
    assert sorted(p.name for p in out.iterdir()) == [
        "alignment.char.txt",
        "alignment.word.txt",
        "hyp.txt",
        "ref.txt",
        "result.md",
        "scores.json",
    ]
