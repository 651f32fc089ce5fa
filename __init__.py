"""ComfyUI entry point of the HyperAlign node pack: the nodes live in nodes/, the core in hyperalign/.

ComfyUI calls comfy_entrypoint() right after importing this file, and only then are the nodes (and
ComfyUI's own modules) imported, so importing this file anywhere else (pytest collects the repo
root as a package) needs nothing and does nothing. The browser extension (web/js) is declared once,
as [tool.comfy] web in pyproject.toml; a WEB_DIRECTORY here would register it a second time.
"""


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()
