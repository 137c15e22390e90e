"""
Talk to a model in the terminal.

    python -m scripts.chat_cli -i sft                            # `clear` starts over, `quit`/`exit`/Ctrl-D ends
    python -m scripts.chat_cli -i sft -p "Why is the sky blue?"  # answer once and exit

The conversation is kept as messages and rendered by the tokenizer's chat format for every reply (the
same rendering as training and the web server); the model's tool calls are kept as python /
python_output parts, so it sees them again as the special tokens it wrote. A conversation that outgrows
the model's context loses its oldest exchanges, with a note (nanochat/serving.py, fit_conversation, as
the web server). Ctrl-C while the model is answering stops that answer.
"""

import argparse
import random

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserError, compute_init
from nanochat.engine import Engine, StreamDecoder, reply_parts
from nanochat.serving import fit_conversation
from nanochat.run import add_checkpoint_flags


def stream_reply(engine, tokens, temperature, top_k):
    """Print the reply as it is sampled (never splitting a character) and return its tokens."""
    decoder = StreamDecoder(engine.tokenizer)
    reply = []
    try:
        for token_column, _ in engine.generate(tokens, num_samples=1, temperature=temperature, top_k=top_k,
                                               seed=random.randrange(2**31)):
            token = token_column[0]
            if token in engine.stop_tokens:
                break
            reply.append(token)
            print(decoder.push(token), end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(decoder.flush())
    return reply


def main():
    parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    add_checkpoint_flags(parser, "sft", ["base", "sft", "rl"])
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
    args = parser.parse_args()
    if args.prompt and not args.prompt.strip():
        parser.error("-p/--prompt is blank")

    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, *_ = load_model(args.source, device, "eval", args.model_tag, args.step)
    engine = Engine(model, tokenizer)
    context = model.config.sequence_len

    if not args.prompt:
        print("nanochat: type a message; 'clear' starts a new conversation, 'quit' or Ctrl-D ends.")
    conversation = []  # {"role", "content"} messages
    while True:
        if args.prompt:
            text = args.prompt
        else:
            try:
                text = input("\nUser: ")
            except EOFError:
                print()
                break
        command = "" if args.prompt else text.strip().lower()  # (-p "clear" asks the model about "clear")
        if command in ("quit", "exit"):
            break
        if command == "clear":
            conversation = []
            print("(new conversation)")
            continue
        if not text.strip():
            continue

        messages = conversation + [{"role": "user", "content": text}]
        try:
            prompt, conversation = fit_conversation(tokenizer, messages, context)
        except ValueError as e:  # this message alone does not fit the model's context
            if args.prompt:
                raise UserError(str(e)) from None
            print(f"({e})")
            continue
        if dropped := len(messages) - len(conversation):
            print(f"(the {dropped} oldest messages no longer fit the model's context of {context} tokens: "
                  "the model does not see them anymore)")
        print("\nAssistant: ", end="", flush=True)
        reply = stream_reply(engine, prompt, args.temperature, args.top_k)
        conversation.append({"role": "assistant", "content": reply_parts(tokenizer.decode(reply))})
        if args.prompt:
            break


if __name__ == "__main__":
    main()
