"""The publisher side shared by the crash-anywhere state machines (durable and cluster): it publishes new
ids, counts what the server confirmed, and keeps what it did not, to re-send as a client does."""

from __future__ import annotations

from hypothesis.stateful import RuleBasedStateMachine, rule

from .wire import RawPeer


class ConfirmingPublisher(RuleBasedStateMachine):
    publisher: RawPeer
    now: float

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 0
        self.unconfirmed: list[str] = []
        self.confirmed: set[str] = set()

    def _pump(self) -> None:
        """Take the publisher's answers: a confirmation moves its id from unconfirmed to confirmed."""
        for response in self.publisher.pump(self.now):
            if response["type"] == "publish_response" and response["success"]:
                self.confirmed.add(response["messageId"])
                if response["messageId"] in self.unconfirmed:
                    self.unconfirmed.remove(response["messageId"])
        self.publisher.received.clear()

    @rule()
    def publish(self) -> None:
        message_id = f"m{self.next_id}"
        self.next_id += 1
        self.unconfirmed.append(message_id)
        self.publisher.publish("t", message_id, now=self.now)
        self._pump()
