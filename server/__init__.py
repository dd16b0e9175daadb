"""The OpenAI-compatible HTTP server behind serve.py:

    app.py            the FastAPI app: the app's state (Server), admission, the routes, streaming
    protocol.py       the request bodies (pydantic models) and the API's errors
    openai_format.py  the response bodies: samples being written, chunks, log-probabilities
    chat.py           chat prompts: the checkpoint's chat template or plain turns, and where a reply ends
"""
