"""The AMQP side shared by coordinator and worker: the link (`link`), URLs (`urls`).

Importing any of it quiets pika's own logger (`flaap_mq.logs.quiet_pika`):
it logs each reconnect attempt at ERROR, which the link reports once itself.
"""

from flaap_mq.logs import quiet_pika

quiet_pika()
