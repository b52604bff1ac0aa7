"""Tiny random-initialised models of each supported family, built from a config in milliseconds."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    OlmoConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    # hybrid attention: sliding layers of 32 interleaved with full ones; soft-capped attention and logits
    # (Gemma 2), per-head q/k norms and a local RoPE base for the sliding layers (Gemma 3)
    "gemma2": lambda: Gemma2Config(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=8.0, final_logit_softcapping=12.0,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=12.0,
        rope_parameters=GEMMA3_ROPE,
    ),
    # sliding layers only: streamed through the sink cache it must equal the model's own forward over the
    # whole text (each layer sees the last 32 tokens, which the cache's window holds)
    "gemma3_sliding": lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention"] * 2, rope_parameters=GEMMA3_ROPE,
    ),
    # learned per-head attention sinks (gpt-oss): transformers' own eager attention keeps them
    "gpt_oss": lambda: GptOssConfig(
        **{**COMMON, "intermediate_size": 64}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # gpt-oss with sliding layers of 32 interleaved with a full one
    "gpt_oss_sliding": lambda: GptOssConfig(
        **{**COMMON, "intermediate_size": 64, "num_hidden_layers": 3}, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
EAGER_ONLY = {"gpt_oss", "gpt_oss_sliding", "gemma2"}  # soft-capping and learned sinks: eager attention only

# variants of the families above whose owned steps need their own checks (tests/engine/test_families_owned.py)
VARIANTS = {
    # Llama 3.1's frequency-dependent RoPE scaling, its bands placed inside the tiny head's 8 frequencies
    "llama3": lambda: LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2.5's layout (biased q/k/v, tied embeddings)
    "qwen2_5": lambda: Qwen2Config(**{**COMMON, "tie_word_embeddings": True}),
    # Phi-3.5 / Phi-4-mini: longrope (short factors within its original positions) over half of each head
    "phi3_longrope": lambda: Phi3Config(**COMMON, pad_token_id=0, original_max_position_embeddings=128,
                                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5,
                                                         "short_factor": [1.0, 1.5, 2.0, 4.0],
                                                         "long_factor": [2.0, 4.0, 8.0, 16.0]}),
    # a family no owned step covers: it decodes through transformers' forward
    "olmo": lambda: OlmoConfig(**COMMON),
}


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa"):
    """A random model of ``family``; weights scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    config = (FAMILIES | VARIANTS)[family]()
    config._attn_implementation = "eager" if family in EAGER_ONLY else attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 2.0)  # learned sinks that matter
            if "proj" in name and p.dim() == 2:
                p.mul_(4.0)
            elif "lm_head" in name:
                p.mul_(16.0)  # logits of order 10, so absolute tolerances mean something
    return model.eval()


def tiny_chat_engine_parts(max_positions: int = 128, seed: int = 0):
    """A tiny Llama with the embedded model's real tokenizer and chat template (vocab 49152)."""
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "max_position_embeddings": max_positions})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def tiny_family_engine(tmp_path, family: str, sink_tokens: int = 4, window: int = 60, seed: int = 0,
                       max_positions: int | None = None, **overrides):
    """A started Engine around a tiny random model of ``family`` (``FAMILIES`` or ``VARIANTS``) with the
    embedded model's real tokenizer and chat template."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare

    engine_config = EngineConfig(sink_tokens=sink_tokens, window=window, evict_block=8, prefill_chunk=32,
                                 data_dir=tmp_path / "sessions", **overrides)
    model, tokenizer = tiny_chat_family_parts(family, max_positions, seed)
    return Engine(engine_config, prepare(model, tokenizer, f"tiny-{family}", engine_config)).start()


def tiny_engine(tmp_path, sink_tokens: int = 4, window: int = 60, max_positions: int = 128, **overrides):
    """A started Engine around a tiny model: fast enough for server and session tests."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare

    model, tokenizer = tiny_chat_engine_parts(max_positions)
    config = EngineConfig(
        sink_tokens=sink_tokens, window=window, evict_block=8, prefill_chunk=32,
        data_dir=tmp_path / "sessions", **overrides,
    )
    return Engine(config, prepare(model, tokenizer, "tiny-llama", config)).start()


def tiny_chat_family_parts(family: str, max_positions: int | None = 128, seed: int = 0):
    """A tiny random model of ``family`` (``FAMILIES`` or ``VARIANTS``) over the embedded model's real
    tokenizer and chat template (vocab 49152); ``max_positions`` None: the config's own."""
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    torch.manual_seed(seed)
    config = (FAMILIES | VARIANTS)[family]()
    config.vocab_size = len(tokenizer)
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    config._attn_implementation = "eager" if family in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer



# ----- chat templates of each family, as their tokenizer_config.json ships them ------------------------
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

QWEN3_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
'''

LLAMA31_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

MISTRAL_TEMPLATE = r'''{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
'''

FAMILY_TEMPLATES = {"qwen2": QWEN25_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "llama": LLAMA31_TEMPLATE,
                    "mistral": MISTRAL_TEMPLATE}
QWEN_TOOL_TOKENS = ("<tool_call>", "</tool_call>")  # added tokens of Qwen's tokenizer, not special


def tokenizer_with_template(template: str, special_tokens: tuple[str, ...] = (), added_tokens: tuple[str, ...] = ()):
    """A copy of the embedded model's tokenizer with another family's chat template, and that family's
    markers added as special tokens (``special_tokens``, e.g. Mistral's ``[TOOL_CALLS]``) or as tokens the
    detokenizer keeps (``added_tokens``, e.g. Qwen's ``<tool_call>``)."""
    import copy

    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    tokenizer = copy.deepcopy(load_tokenizer(None, EngineConfig().cache_dir))
    tokenizer.chat_template = template
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    return tokenizer


def tiny_template_engine(tmp_path, template: str, special_tokens: tuple[str, ...] = (), sink_tokens: int = 4,
                         window: int = 200, max_positions: int = 1024, seed: int = 0,
                         added_tokens: tuple[str, ...] = ()):
    """A started Engine around a tiny random Llama whose tokenizer carries ``template``."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare

    tokenizer = tokenizer_with_template(template, special_tokens, added_tokens)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "max_position_embeddings": max_positions})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    engine_config = EngineConfig(sink_tokens=sink_tokens, window=window, evict_block=8, prefill_chunk=64,
                                 data_dir=tmp_path / "sessions")
    return Engine(engine_config, prepare(model, tokenizer, "tiny-family", engine_config)).start()


def tiny_family_dir(path, template: str, special_tokens: tuple[str, ...] = (), end_tokens: tuple[str, ...] = (),
                    **generation) -> str:
    """A Hugging Face model directory: a tiny random Llama, the embedded tokenizer with ``template`` and
    ``special_tokens``, and a generation config whose end-of-turn ids are the eos and ``end_tokens`` and
    whose sampling defaults are ``generation`` (``temperature=0.7`` ...)."""
    tokenizer = tokenizer_with_template(template, special_tokens)
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)})
    model = AutoModelForCausalLM.from_config(config).eval()
    ends = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(end_tokens))]
    model.generation_config.eos_token_id = ends if end_tokens else ends[0]
    for name, value in generation.items():
        setattr(model.generation_config, name, value)
    if generation:
        model.generation_config.do_sample = True
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
