"""Reads one message off a RabbitMQ queue with pika, as a Python consumer of txoutbox would.

Usage: read_message.py AMQP_URL QUEUE TIMEOUT_SECONDS

Takes the first message that arrives within the timeout (basic_get, polled), acks it, and
prints one JSON object on stdout:

- "properties": message_id, type, content_type and the headers as pika decodes them;
- "cloudevent": the message parsed by the `cloudevents` package (PyPI) with its AMQP protocol
  binding, cloudevents.core.bindings.amqp: pika's headers are the application properties
  (AMQP 0-9-1 has no other place for them), its content_type the AMQP content-type property,
  its body the application data; null if it does not parse, with "cloudevent_error" saying why.

Exit status 3 (and a line on stderr) when pika or cloudevents is not installed, 4 when no
message arrived in time.
"""

import json
import sys
import time
from datetime import timezone

try:
    import pika
except ImportError:
    sys.stderr.write("python module pika is missing: pip install pika cloudevents\n")
    sys.exit(3)
try:
    from cloudevents.core.bindings import amqp as ce_amqp
except ImportError:
    sys.stderr.write(
        "python module cloudevents (2.x, with cloudevents.core.bindings.amqp) is missing: "
        "pip install 'cloudevents>=2' pika\n"
    )
    sys.exit(3)


def text(value):
    """pika gives AMQP long strings as str, or bytes when they are not UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def main():
    url, queue, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        while True:
            method, properties, body = channel.basic_get(queue=queue, auto_ack=False)
            if method is not None:
                break
            if time.monotonic() > deadline:
                sys.stderr.write(f"no message on {queue} within {timeout} s\n")
                sys.exit(4)
            connection.sleep(0.05)
        channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()

    headers = {k: text(v) for k, v in (properties.headers or {}).items()}
    out = {
        "properties": {
            "message_id": properties.message_id,
            "type": properties.type,
            "content_type": properties.content_type,
            "headers": headers,
        },
        "body": json.loads(body),
        "cloudevent": None,
    }
    message = ce_amqp.AMQPMessage(
        properties={"content-type": properties.content_type} if properties.content_type else {},
        application_properties=headers,
        application_data=body,
    )
    try:
        event = ce_amqp.from_binary_event(message)
        when = event.get_time()
        out["cloudevent"] = {
            "specversion": event.get_specversion(),
            "id": event.get_id(),
            "type": event.get_type(),
            "source": event.get_source(),
            "subject": event.get_subject(),
            # RFC 3339 in UTC with microseconds, as the service writes its own times.
            "time": (
                when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                if when is not None
                else None
            ),
            "datacontenttype": event.get_datacontenttype(),
            "data": event.get_data(),
        }
    except Exception as e:  # reported to the Rust test, which fails with it
        out["cloudevent_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
