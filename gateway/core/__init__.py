"""Sans-IO core: everything that decides, with no sockets, files, clocks or event loop.

Modules here take bytes, dicts and frozen dataclasses and return values or raise. They must never import
asyncio, aiohttp, ssl, or read files or the time; the I/O shell passes those in.
"""
