"""The AMQP side shared by coordinator and worker.

The link (`link`: one connection on its own I/O thread), its publisher-confirm
bookkeeping (`confirms`), what a broker's close means (`refusals`), declaring
`flaap_mq.protocol.topology` on a channel (`declare`), the errors (`errors`).
Broker URLs: their text, lists of nodes and redaction (`urls`), where they
come from and which files hold secrets (`credentials`), TLS (`tls`), pika's
connection parameters (`address`), connecting and why it failed (`connect`).

Importing any of it quiets pika's own logger (`flaap_mq.logs.quiet_pika`):
it logs each reconnect attempt at ERROR, which the link reports once itself.
"""

from flaap_mq.logs import quiet_pika

quiet_pika()
