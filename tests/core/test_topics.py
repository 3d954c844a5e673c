"""Topic filters: the matcher, "filter within filter" and the trie, against simple reference implementations."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.errors import ErrorCode, RemoteProtocolError
from fastport_core.topics import (
    TopicTrie,
    check_filter,
    check_topic,
    filter_matches,
    filter_within,
    within_any,
)

# -- references -------------------------------------------------------------------------------------------


def reference_regex(topic_filter: str) -> re.Pattern[str]:
    """MQTT semantics as a regular expression, built independently of the level walk under test."""
    levels = topic_filter.split("/")
    hashed = levels[-1] == "#"
    parts = ["[^/]*" if level == "+" else re.escape(level) for level in (levels[:-1] if hashed else levels)]
    if not hashed:
        return re.compile("/".join(parts))
    if not parts:
        return re.compile(".*", re.DOTALL)
    return re.compile("/".join(parts) + "(/.*)?", re.DOTALL)  # the parent level itself, or anything below


def reference_matches(topic_filter: str, topic: str) -> bool:
    return reference_regex(topic_filter).fullmatch(topic) is not None


LITERALS = ["a", "b", ""]
FRESH = "z"
"""A level no filter names: a ``+`` can take a value no literal covers."""


def all_topics(max_levels: int) -> list[str]:
    alphabet = [*LITERALS, FRESH]
    return [
        "/".join(levels)
        for count in range(1, max_levels + 1)
        for levels in itertools.product(alphabet, repeat=count)
    ]


TOPICS_UP_TO_6 = all_topics(6)


def reference_within(inner: str, outer: str) -> bool:
    """Every topic (over an alphabet with a fresh level, long enough to outgrow both) that ``inner`` matches,
    ``outer`` matches too."""
    inner_re, outer_re = reference_regex(inner), reference_regex(outer)
    return all(outer_re.fullmatch(t) for t in TOPICS_UP_TO_6 if inner_re.fullmatch(t))


# -- strategies -------------------------------------------------------------------------------------------

levels = st.lists(st.sampled_from(LITERALS), min_size=1, max_size=5)
topics = levels.map("/".join)


@st.composite
def filters(draw: st.DrawFn, max_levels: int = 5) -> str:
    body = draw(st.lists(st.sampled_from([*LITERALS, "+"]), min_size=0, max_size=max_levels - 1))
    if draw(st.booleans()):
        return "/".join([*body, "#"])
    return "/".join(body or [draw(st.sampled_from([*LITERALS, "+"]))])


# -- the matcher ------------------------------------------------------------------------------------------


@given(filters(), st.lists(st.sampled_from([*LITERALS, FRESH]), min_size=1, max_size=6).map("/".join))
@settings(max_examples=500)
def test_matcher_agrees_with_the_reference(topic_filter: str, topic: str) -> None:
    assert filter_matches(topic_filter, topic) == reference_matches(topic_filter, topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/#", "a", True),  # MQTT: '#' includes the parent level
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "anything/at/all", True),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+", "", True),  # an empty level is a level
        ("+/+", "/finance", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+", "a", False),
        ("a/+/#", "a", False),
        ("a/+/#", "a/b", True),
    ],
)
def test_matcher_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert filter_matches(topic_filter, topic) is expected
    assert reference_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a+", "#a", "a/b#", "+a/b", "a/++", "##", "a/#/#"])
def test_malformed_filters_are_refused(bad: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        check_filter(bad)
    assert caught.value.code is ErrorCode.INVALID_FILTER


@pytest.mark.parametrize("good", ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+/#", "/", "a//b", "//#"])
def test_well_formed_filters_pass(good: str) -> None:
    check_filter(good)


@pytest.mark.parametrize("bad", ["a/+", "#", "a#b", "x+y"])
def test_publish_topics_with_wildcards_are_refused(bad: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        check_topic(bad)
    assert caught.value.code is ErrorCode.INVALID_TOPIC


# -- filter within filter ---------------------------------------------------------------------------------


@given(filters(max_levels=4), filters(max_levels=4))
@settings(max_examples=300, deadline=None)
def test_within_agrees_with_enumeration(inner: str, outer: str) -> None:
    assert filter_within(inner, outer) == reference_within(inner, outer)


@given(filters(max_levels=4), filters(max_levels=4), filters(max_levels=4))
@settings(max_examples=200)
def test_within_is_a_preorder(a: str, b: str, c: str) -> None:
    assert filter_within(a, a)
    if filter_within(a, b) and filter_within(b, c):
        assert filter_within(a, c)


@given(topics, filters())
def test_a_topic_is_within_a_filter_exactly_when_it_matches(topic: str, topic_filter: str) -> None:
    assert filter_within(topic, topic_filter) == filter_matches(topic_filter, topic)


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        ("a/b", "a/+", True),
        ("a/+", "a/b", False),  # '+' can be any level, not only b
        ("a/#", "a/+", False),  # '#' can be several levels (or none)
        ("a", "a/#", True),
        ("a/#", "a", False),
        ("a/+/#", "a/#", True),
        ("a/#", "a/+/#", False),  # a/# matches a itself
        ("#", "+/+/#", False),
        ("#", "+/#", True),  # every topic has a first level (maybe empty) for '+'
        ("+/#", "#", True),
    ],
)
def test_within_examples(inner: str, outer: str, expected: bool) -> None:
    assert filter_within(inner, outer) is expected


def test_within_any_is_conservative_about_unions() -> None:
    assert within_any("a/b", ["x", "a/+"])
    assert not within_any("a/+", ["a/x", "a/y"])
    assert not within_any("a/b", [])


# -- the trie ---------------------------------------------------------------------------------------------


@given(
    st.lists(st.tuples(filters(), st.integers(0, 5)), max_size=30),
    st.lists(st.tuples(filters(), st.integers(0, 5)), max_size=10),
    st.lists(st.sampled_from([*LITERALS, FRESH]), min_size=1, max_size=6).map("/".join),
)
@settings(max_examples=300)
def test_trie_matches_like_a_linear_scan(
    added: list[tuple[str, int]], removed: list[tuple[str, int]], topic: str
) -> None:
    trie: TopicTrie[int] = TopicTrie()
    pairs: set[tuple[str, int]] = set()
    for topic_filter, value in added:
        trie.add(topic_filter, value)
        pairs.add((topic_filter, value))
    for topic_filter, value in removed:
        trie.discard(topic_filter, value)
        pairs.discard((topic_filter, value))
    assert len(trie) == len(pairs)
    expected = {value for topic_filter, value in pairs if reference_matches(topic_filter, topic)}
    found = trie.match(topic)
    assert set(found) == expected
    assert len(found) == len(expected)  # each value once


def test_trie_prunes_empty_nodes() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a/+/c/#", "s")
    trie.discard("a/+/c/#", "s")
    assert len(trie) == 0
    assert not trie._root.children
