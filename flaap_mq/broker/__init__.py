"""The AMQP side shared by coordinator and worker.

The link (`link`: one connection on its own I/O thread), its publisher-confirm
bookkeeping (`confirms`), what a broker's close means (`refusals`), declaring
`flaap_mq.protocol.topology` on a channel (`declare`), the errors (`errors`),
URLs (`urls`).

Importing any of it quiets pika's own logger (`flaap_mq.logs.quiet_pika`):
it logs each reconnect attempt at ERROR, which the link reports once itself.
"""

from flaap_mq.logs import quiet_pika

quiet_pika()
