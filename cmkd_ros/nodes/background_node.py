"""An rclpy node in its own context, spun by a daemon thread.

For tools and tests that talk to real node processes from an ordinary program: ``cmkd
evaluate-bag``, the node benchmarks and the integration tests. rclpy is imported on first use,
so importing this module needs no ROS environment.
"""
from __future__ import annotations

import threading


class BackgroundNode:
    """Node ``name`` in a fresh ``rclpy.Context`` (on ``domain_id``, or ROS_DOMAIN_ID when
    None), spun every 50 ms by a daemon thread until :meth:`close`; a context manager.

    Publishers and subscriptions may be added while it spins (``self.node``).
    """

    def __init__(self, name: str, domain_id: int | None = None):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name=f'{name}_spin', daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:
                if self.context.ok():
                    raise  # a callback failed: threading.excepthook reports it
                break      # the context was shut down underneath

    def close(self) -> None:
        """Stop spinning, then destroy the node and shut its context down."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.executor.shutdown(timeout_sec=1)
        self.node.destroy_node()
        self.context.try_shutdown()

    def __enter__(self) -> BackgroundNode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
