"""An overload's retry hint, as the trailing metadata a call ends with (RFC 9110 delay-seconds)."""

from __future__ import annotations

import pytest

from embedserve.errors import RETRY_AFTER, InvalidInputError, OverloadedError, trailing_metadata
from embedserve.kinds import Capability


@pytest.mark.parametrize(("retry_after_s", "sent"), [(None, "1"), (0.0, "1"), (0.2, "1"), (1.0, "1"), (2.5, "3")])
def test_an_overload_says_whole_seconds_to_wait_at_least_one(retry_after_s: float | None, sent: str) -> None:
    assert trailing_metadata(OverloadedError("queue full", retry_after_s=retry_after_s)) == ((RETRY_AFTER, sent),)


def test_other_errors_send_no_retry_hint() -> None:
    assert trailing_metadata(InvalidInputError("empty input")) == ()
    assert trailing_metadata(ValueError("a bug")) == ()


def test_an_overload_message_is_rendered_as_any_other() -> None:
    error = OverloadedError(lambda words: f"send to {words(Capability.EMBED)[0]} later", retry_after_s=3)
    assert str(error) == "send to embed later"
    assert error.render(lambda _: ("Embed",)) == "send to Embed later"
