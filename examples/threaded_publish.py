"""The blocking client in one page: subscribe with a callback, iterate a topic, publish from threads.

Start a broker (``scripts/serve``), then, with the same key on every client::

    export FASTPORT_SESSION=demo FASTPORT_PASSWORD=demo-password FASTPORT_KEY=$(.venv/bin/fastport keygen)
    .venv/bin/python examples/threaded_publish.py

``FASTPORT_URL`` defaults to ``ws://127.0.0.1:3000``. The example talks to itself through two clients,
because the server never sends a message back to the connection that published it.
"""

from __future__ import annotations

import os
import threading

import fastport_threads


def main() -> None:
    url = os.environ.get("FASTPORT_URL", "ws://127.0.0.1:3000")
    session = os.environ.get("FASTPORT_SESSION", "demo")
    password = os.environ.get("FASTPORT_PASSWORD", "demo-password")
    key = os.environ["FASTPORT_KEY"]  # base64, from `fastport keygen`; the same on every client

    with (
        fastport_threads.connect(url, session=session, password=password, key=key) as subscriber,
        fastport_threads.connect(url, session=session, password=password, key=key) as publisher,
    ):
        # A callback runs on the subscriber's dispatcher thread; a slow one never stalls the connection.
        alerts = threading.Event()
        subscriber.subscribe("sensors/alerts", lambda message: alerts.set())

        # An iterator: subscribed (and confirmed) before messages() returns, so nothing is missed.
        with subscriber.messages("sensors/temp", timeout=5.0) as readings:
            # Several threads may share one client; each publish returns once the server confirmed it.
            workers = [
                threading.Thread(target=publisher.publish, args=("sensors/temp", reading))
                for reading in ("24.5C", "24.7C")
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            message_id = publisher.publish("sensors/alerts", b"\x01 binary payloads work too", timeout=10.0)
            print("confirmed", message_id)

            for count, message in enumerate(readings, start=1):  # ends after 5 s without a message
                print(message.topic, message.payload)
                if count == len(workers):
                    break
        alerts.wait(5.0)


if __name__ == "__main__":
    main()
