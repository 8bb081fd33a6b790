"""The rules that span keys, alone: who is visible, and why the others wait."""

from __future__ import annotations

from eventpipe.visibility import (
    CURRENCY_MISMATCH,
    EMAIL_TAKEN,
    MISSING_PARENT,
    order_standing,
    payment_standing,
    user_standing,
)


def test_the_email_belongs_to_its_earliest_claimant() -> None:
    assert user_standing("u1", "a@x.io", "u1") is None
    held = user_standing("u2", "a@x.io", "u1")
    assert held is not None and held.error_class == EMAIL_TAKEN and not held.waits
    assert (held.parent_kind, held.parent_key) == ("user", "u1")
    assert "belongs to user 'u1'" in held.reason


def test_an_order_waits_for_its_user() -> None:
    assert order_standing("u1", None, user_exists=True) is None
    missing = order_standing("u1", None, user_exists=False)
    assert missing is not None and missing.error_class == MISSING_PARENT and missing.waits
    assert missing.reason == "user 'u1' not found"
    displaced = order_standing("u1", user_standing("u1", "a@x.io", "u0"),
                               user_exists=True)
    assert displaced is not None and displaced.error_class == MISSING_PARENT
    assert "not in the read model (EmailTaken" in displaced.reason


def test_a_payment_needs_its_order_in_its_currency() -> None:
    assert payment_standing("o1", "EUR", "EUR", None) is None
    missing = payment_standing("o1", "EUR", None, None)
    assert missing is not None and missing.error_class == MISSING_PARENT and missing.waits
    mismatch = payment_standing("o1", "USD", "EUR", None)
    assert mismatch is not None and mismatch.error_class == CURRENCY_MISMATCH
    assert not mismatch.waits and (mismatch.parent_kind, mismatch.parent_key) == ("order", "o1")
