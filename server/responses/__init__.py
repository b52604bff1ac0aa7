"""OpenAI's Responses API: the route (``route``), its wire format (``protocol``), the translation to chat's
tool machinery (``chat``), the output items built from the reply (``output``) and stored responses
(``store``)."""
