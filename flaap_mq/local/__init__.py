"""A federation on one machine: a throwaway broker and real worker processes.

What `flaap-mq demo`, the benchmarks and the tests start: `broker.py` (the
local broker if it answers, else a container, `container.py`, else a private
`rabbitmq-server` node, `private_node.py`) and
`workers.py` (`flaap-mq worker` processes, started and always stopped as a
fleet). Both run the real thing, as an operator would; nothing here is a
stand-in.
"""
