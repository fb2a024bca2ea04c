"""Running the gateway: one serving process (listeners, signals, reload, drain), the admin
listener, and the supervisor of worker processes.
"""
