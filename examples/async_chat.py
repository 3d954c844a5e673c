"""The async client in one page: a handler that answers, an iterator that reads, bytes and text payloads.

Start a broker (``scripts/serve``), then, with the same key on every client::

    export FASTPORT_SESSION=demo FASTPORT_PASSWORD=demo-password FASTPORT_KEY=$(.venv/bin/fastport keygen)
    .venv/bin/python examples/async_chat.py

``FASTPORT_URL`` defaults to ``ws://127.0.0.1:3000``. Two clients talk to each other, because the server
never sends a message back to the connection that published it. Runs on asyncio; pass ``trio`` as the
first argument to run it on trio instead.
"""

from __future__ import annotations

import os
import sys

import anyio

import fastport_anyio


async def main() -> None:
    url = os.environ.get("FASTPORT_URL", "ws://127.0.0.1:3000")
    session = os.environ.get("FASTPORT_SESSION", "demo")
    password = os.environ.get("FASTPORT_PASSWORD", "demo-password")
    key = os.environ["FASTPORT_KEY"]

    async with (
        fastport_anyio.connect(url, session=session, password=password, key=key) as alice,
        fastport_anyio.connect(url, session=session, password=password, key=key) as bob,
    ):
        alice.on_state_change(lambda change: print(f"alice is {change.state.value} {change.reason}"))

        # A handler runs on a task of its own, so it may await, even publish: a slow handler never
        # stalls the connection (keepalive, other topics, publishes go on).
        async def answer(message: fastport_anyio.Message) -> None:
            if isinstance(message.payload, bytes):
                reply = f"got {len(message.payload)} bytes"
            else:
                reply = f"you said {message.payload!r}"
            await bob.publish("chat/answers", reply)

        await bob.subscribe("chat/questions", answer)  # returns once the server confirmed it

        # An iterator, subscribed (and confirmed) on entry, so nothing published afterwards is missed.
        async with alice.subscription("chat/answers") as answers:
            for question in ("hello", "how are you?", b"\x89PNG\r\n"):
                message_id = await alice.publish("chat/questions", question)  # confirmed by the server
                print(f"alice asked {question!r} ({message_id})")
                answer_message = await answers.receive()
                print(f"bob answered {answer_message.payload!r}")

        print(f"integrity failures seen by alice: {alice.integrity_failures}")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
