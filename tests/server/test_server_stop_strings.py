"""The stop-string detector: nothing of a stop string is emitted, however the text is split."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.stop_strings import StopStringDetector


def run(pieces: list[str], stop: list[str]) -> tuple[list[str], bool]:
    detector = StopStringDetector(stop)
    emitted = [detector.feed(piece) for piece in pieces]
    if not detector.stopped:
        emitted.append(detector.flush())
    return emitted, detector.stopped


def test_stop_split_across_pieces_never_leaks():
    emitted, stopped = run(["Hello wo", "rl", "d! more"], ["world"])
    assert stopped
    assert "".join(emitted) == "Hello "
    assert all("w" not in piece for piece in emitted)


def test_partial_match_is_released_when_it_cannot_complete():
    detector = StopStringDetector(["STOP"])
    assert detector.feed("abc ST") == "abc "
    assert detector.feed("x") == "STx"
    assert detector.flush() == ""


def test_held_text_released_at_the_end():
    detector = StopStringDetector(["</end>"])
    assert detector.feed("answer </e") == "answer "
    assert detector.flush() == "</e"


def test_earliest_of_several_stops_wins():
    emitted, stopped = run(["one two three"], ["three", "two"])
    assert stopped and "".join(emitted) == "one "


def test_no_stops_passes_text_through():
    detector = StopStringDetector([])
    assert detector.feed("anything") == "anything"
    assert detector.flush() == ""


def test_nothing_after_stop():
    detector = StopStringDetector(["x"])
    assert detector.feed("axb") == "a"
    assert detector.feed("more") == ""
    assert detector.flush() == ""


alphabet = st.sampled_from("ab c\n")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    stop=st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3),
)
@example(text=" aa", cuts=[2], stop=["a", " aa"])
def test_property_output_is_text_before_first_stop(text, cuts, stop):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, stopped = run(pieces, stop)
    # Generation halts in the first piece that completes any stop string; the output ends where the
    # earliest stop found in the text so far begins. (A longer stop that starts earlier but would
    # only complete in a later piece never gets the chance: found by hypothesis, text=' aa',
    # pieces [' a', 'a'], stop=['a', ' aa'] -> ' '.)
    seen, expected, should_stop = "", text, False
    for piece in pieces:
        seen += piece
        hits = [i for i in (seen.find(s) for s in stop) if i >= 0]
        if hits:
            expected, should_stop = seen[: min(hits)], True
            break
    assert stopped == should_stop
    assert "".join(emitted) == expected
