"""
Talk to a model in the terminal.

    python -m scripts.chat_cli -i sft                            # `clear` starts over, `quit`/`exit`/Ctrl-D ends
    python -m scripts.chat_cli -i sft -p "Why is the sky blue?"  # answer once and exit

The conversation is kept as messages and rendered by the tokenizer's chat format for every reply (the
same rendering as training and the web server); the model's tool calls are kept as python /
python_output parts, so it sees them again as the special tokens it wrote. Ctrl-C while the model is
answering stops that answer.
"""

import argparse
import random

from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init
from nanochat.engine import Engine, StreamDecoder, reply_parts
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
    parser.add_argument("-t", "--temperature", type=float, default=0.6)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
    args = parser.parse_args()

    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, *_ = load_model(args.source, device, "eval", args.model_tag, args.step)
    engine = Engine(model, tokenizer)

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
        command = text.strip().lower()
        if command in ("quit", "exit"):
            break
        if command == "clear":
            conversation = []
            print("(new conversation)")
            continue
        if not command:
            continue

        conversation.append({"role": "user", "content": text})
        prompt = tokenizer.render_for_completion({"messages": conversation + [{"role": "assistant", "content": ""}]})
        print("\nAssistant: ", end="", flush=True)
        try:
            reply = stream_reply(engine, prompt, args.temperature, args.top_k)
            conversation.append({"role": "assistant", "content": reply_parts(tokenizer.decode(reply))})
        except ValueError as e:  # the conversation no longer fits the model's context
            conversation.pop()
            print(f"\n{e}. Type 'clear' to start a new conversation.")
        if args.prompt:
            break


if __name__ == "__main__":
    main()
