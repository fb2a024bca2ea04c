"""The YAML file as typed settings, compiled once into what the request path reads: projects with
their keys, routes and the router.
"""
