/// What the conversation needs from a tokenizer: text to ids (no BOS), and control pieces by id.
public protocol TextTokenizer {
    func encode(_ text: String) -> [Int]
    func controlId(_ piece: String) throws -> Int
    func decode(_ ids: [Int]) -> String
}

/// A multi-turn chat whose cache carries the history: each turn feeds only the tokens that are new
/// since the last one (closing the model's turn, then the user's message). Mirrors
/// gemma3_export.chat.Conversation.
public final class Conversation {
    public let generator: Generator
    public let system: String?
    private let tokenizer: TextTokenizer
    /// Every token the cache holds, in order.
    public private(set) var fed: [Int] = []
    /// The last token of a reply cut before a stop id: sampled, not yet fed.
    public private(set) var pending: Int?

    public init(generator: Generator, tokenizer: TextTokenizer, system: String? = nil) {
        self.generator = generator
        self.tokenizer = tokenizer
        self.system = system
    }

    public func reset() throws {
        try generator.reset()
        fed = []
        pending = nil
    }

    /// What the cache still needs before the model answers `text`.
    public func nextIds(_ text: String) throws -> [Int] {
        let parts: [GemmaChat.Part]
        if fed.isEmpty {
            let opening = system.map { [GemmaChat.Message(role: "system", content: $0)] } ?? []
            parts = try GemmaChat.parts(opening + [GemmaChat.Message(role: "user", content: text)])
        } else {
            parts = try GemmaChat.nextTurnParts(text)
        }
        let tokenizer = self.tokenizer
        let ids = try GemmaChat.assembleIds(parts, controlId: { try tokenizer.controlId($0) }, encode: { tokenizer.encode($0) })
        var carried: [Int] = []
        if !fed.isEmpty, let token = pending { carried.append(token) }
        return carried + ids
    }

    /// The model's answer to `text`, token by token through `onToken`.
    public func say(_ text: String, maxNewTokens: Int, stopIds: Set<Int>, sampler: TokenSampler,
                    shouldStop: () -> Bool = { false }, onToken: (Int) -> Void = { _ in }) throws -> Reply {
        try GemmaChat.checkUserText(text)
        let ids = try nextIds(text)
        if !fed.isEmpty, !ChunkPlan.fits(position: generator.position, count: ids.count + maxNewTokens, maxContext: generator.maxContext) {
            throw BundleError("The conversation no longer fits the context; tap Reset to start over.")
        }
        guard generator.position == fed.count else {
            throw BundleError("The runner was used outside this conversation; tap Reset to start over.")
        }
        let reply = try generator.generate(prompt: ids, maxNewTokens: maxNewTokens, stopIds: stopIds,
                                           sampler: sampler, shouldStop: shouldStop, onToken: onToken)
        fed += ids
        let decoded = generator.position - fed.count
        fed += reply.tokens.prefix(decoded)
        pending = decoded < reply.tokens.count ? reply.tokens[decoded] : nil
        return reply
    }
}
