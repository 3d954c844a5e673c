"""Topic filters (DESIGN §10): validation, matching, "filter within filter", and the routing trie.

A topic is split into *levels* by ``/``. A filter is a topic whose levels may also be the wildcards of MQTT
3.1.1 (§4.7): ``+`` matches exactly one level (which may be empty) and ``#``, allowed only as the last
level, matches any number of remaining levels, *including none*: ``sensors/#`` matches ``sensors`` itself
as well as ``sensors/a`` and ``sensors/a/b`` (the MQTT rule, "the multi-level wildcard represents the
parent and any number of child levels"). ``#`` alone matches every topic. A wildcard must be a whole level:
``a+``, ``#a``, ``a/#/b`` are malformed. A publish topic may contain neither character. MQTT's special
handling of topics that start with ``$`` does not apply: fastport has no system topics.

Routing: exact subscriptions stay in the session's plain dict (one lookup per publish, the fast path);
only filters with a wildcard go into a :class:`TopicTrie`, whose match walks at most ``2 * levels`` nodes
whatever the number of filters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Generic, TypeVar

from .errors import ErrorCode, RemoteProtocolError

__all__ = [
    "TopicTrie",
    "check_filter",
    "check_topic",
    "filter_matches",
    "filter_within",
    "has_wildcard",
    "within_any",
]

SINGLE: Final = "+"
MULTI: Final = "#"

T = TypeVar("T")


def has_wildcard(text: str) -> bool:
    """Whether ``text`` uses a wildcard character anywhere (a publish topic may not)."""
    return SINGLE in text or MULTI in text


def check_topic(topic: str) -> None:
    """Refuse a publish topic holding ``+`` or ``#`` (``invalid_topic``): it would be ambiguous to route."""
    if has_wildcard(topic):
        raise RemoteProtocolError(
            f"a publish topic may not contain '+' or '#' (they are subscription wildcards): {topic[:64]!r}",
            code=ErrorCode.INVALID_TOPIC,
        )


def check_filter(topic_filter: str) -> None:
    """Refuse a malformed filter (``invalid_filter``): a wildcard sharing its level with other characters,
    or ``#`` anywhere but the last level."""
    if not has_wildcard(topic_filter):
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level in (SINGLE, MULTI):
            if level == MULTI and index != last:
                break
            continue
        if has_wildcard(level):
            break
    else:
        return
    raise RemoteProtocolError(
        f"malformed topic filter {topic_filter[:64]!r}: '+' and '#' must each be a whole level, "
        "and '#' only the last one",
        code=ErrorCode.INVALID_FILTER,
    )


def _levels_match(pattern: Sequence[str], levels: Sequence[str]) -> bool:
    for index, want in enumerate(pattern):
        if want == MULTI:
            return True
        if index >= len(levels) or (want != SINGLE and want != levels[index]):
            return False
    return len(pattern) == len(levels)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether the (well-formed) filter matches the topic."""
    return _levels_match(topic_filter.split("/"), topic.split("/"))


def filter_within(inner: str, outer: str) -> bool:
    """Whether every topic ``inner`` matches is also matched by ``outer`` (both well-formed filters).

    Level by level: ``#`` in ``outer`` covers whatever is left of ``inner`` (nothing included); otherwise
    the level counts must agree, and each level of ``inner`` must be covered by the same level of
    ``outer``: a literal by itself or ``+``, a ``+`` only by ``+`` (a ``+`` can take a value that no
    literal equals), a ``#`` only by ``#`` (it can stand for any number of levels), except that a lone
    ``#`` is ``+/#`` (every topic has a first level). A topic is a filter
    without wildcards, so ``filter_within(topic, f)`` is ``filter_matches(f, topic)``.
    """
    # Every topic has at least one level, so a lone ``#`` matches exactly what ``+/#`` does.
    inner_levels = [SINGLE, MULTI] if inner == MULTI else inner.split("/")
    outer_levels = outer.split("/")
    for index, want in enumerate(outer_levels):
        if want == MULTI:
            return True
        if index >= len(inner_levels):
            return False
        have = inner_levels[index]
        if have == MULTI or (want != SINGLE and (have == SINGLE or have != want)):
            return False
    return len(inner_levels) == len(outer_levels)


def within_any(inner: str, allowed: Iterable[str]) -> bool:
    """Whether ``inner`` is within at least one filter of ``allowed`` (a token's scope check).

    Conservative on purpose: a filter that only the *union* of several allowed filters covers (``a/+``
    against ``a/x`` and ``a/y`` when only ``x`` and ``y`` exist today) is refused; levels are unbounded,
    so no finite list of literals ever covers a ``+``.
    """
    return any(filter_within(inner, outer) for outer in allowed)


class _Node(Generic[T]):
    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        """Next level (a literal, or ``+``) → node."""
        self.here: dict[T, None] = {}
        """Values of filters that end at this node."""
        self.rest: dict[T, None] = {}
        """Values of filters that end with ``#`` after this node: they match here and everything below."""


class TopicTrie(Generic[T]):
    """Wildcard filters → values (subscribers), matched against a topic in O(levels), not O(filters).

    Each (filter, value) pair is stored once; adding it again is a no-op. :meth:`match` returns every
    value with at least one matching filter, each once (a subscriber whose filters overlap gets one
    delivery), in no particular order.
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """How many (filter, value) pairs are stored."""
        return self._count

    def add(self, topic_filter: str, value: T) -> None:
        node = self._root
        levels = topic_filter.split("/")
        hashed = levels[-1] == MULTI
        for level in levels[:-1] if hashed else levels:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        table = node.rest if hashed else node.here
        if value not in table:
            table[value] = None
            self._count += 1

    def discard(self, topic_filter: str, value: T) -> None:
        """Remove the pair if present, pruning nodes left empty."""
        levels = topic_filter.split("/")
        hashed = levels[-1] == MULTI
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for level in levels[:-1] if hashed else levels:
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        table = node.rest if hashed else node.here
        if table.pop(value, _MISSING) is _MISSING:
            return
        self._count -= 1
        for parent, level in reversed(path):
            if node.children or node.here or node.rest:
                break
            del parent.children[level]
            node = parent

    def match(self, topic: str) -> dict[T, None]:
        """Every value with a filter matching ``topic`` (an ordered set, each value once)."""
        found: dict[T, None] = {}
        nodes = [self._root]
        for level in topic.split("/"):
            following: list[_Node[T]] = []
            for node in nodes:
                if node.rest:
                    found.update(node.rest)
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
                child = node.children.get(SINGLE)
                if child is not None:
                    following.append(child)
            if not following:
                return found
            nodes = following
        for node in nodes:
            if node.here:
                found.update(node.here)
            if node.rest:  # ``a/#`` matches ``a`` itself
                found.update(node.rest)
        return found


_MISSING: Final = object()
