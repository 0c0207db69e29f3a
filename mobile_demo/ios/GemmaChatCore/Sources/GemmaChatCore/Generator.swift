/// One cached forward over the artifact: tokens [1, T] starting at `position` -> the last token's logits.
public protocol LogitsStep: AnyObject {
    func step(tokens: [Int32], position: Int) throws -> [Float]
    /// Start over with an empty cache.
    func resetState() throws
}

/// Why a reply ended.
public enum EndReason: Equatable {
    case stop(Int)  // a stop id was sampled (not emitted, not fed)
    case length     // max new tokens
    case context    // the context is full
    case cancelled  // the user stopped it
}

public struct Reply: Equatable {
    public var tokens: [Int]
    public var reason: EndReason
    /// A reply not ended by a stop id leaves its last token sampled but not fed.
    public var pending: Int?
}

/// Chunked prefill, decode and the generation loop over a `LogitsStep`; mirrors
/// gemma3_export.generate.Runner and generate().
public final class Generator {
    public let maxContext: Int
    public let prefillChunks: [Int]
    public private(set) var position = 0
    private let model: LogitsStep

    public init(model: LogitsStep, maxContext: Int, prefillChunks: [Int]) {
        self.model = model
        self.maxContext = maxContext
        self.prefillChunks = prefillChunks
    }

    /// Forget the conversation: the next token goes to position 0.
    public func reset() throws {
        try model.resetState()
        position = 0
    }

    /// Feed `ids` after what the cache holds; returns the last token's logits.
    public func prefill(_ ids: [Int]) throws -> [Float] {
        guard !ids.isEmpty else { throw BundleError("The prompt is empty.") }
        try checkRoom(ids.count)
        var logits: [Float] = []
        var start = 0
        for size in ChunkPlan.plan(ids.count, accepted: prefillChunks) {
            logits = try model.step(tokens: ids[start..<start + size].map { Int32($0) }, position: position)
            position += size
            start += size
        }
        return logits
    }

    public func decode(_ token: Int) throws -> [Float] {
        try checkRoom(1)
        let logits = try model.step(tokens: [Int32(token)], position: position)
        position += 1
        return logits
    }

    /// New tokens after `prompt` until a stop id, `maxNewTokens`, a full context, or `shouldStop()`;
    /// `onToken` sees each emitted token as it comes.
    public func generate(prompt: [Int], maxNewTokens: Int, stopIds: Set<Int>, sampler: TokenSampler,
                         shouldStop: () -> Bool = { false }, onToken: (Int) -> Void = { _ in }) throws -> Reply {
        var logits = try prefill(prompt)
        var reply = Reply(tokens: [], reason: .length, pending: nil)
        for i in 0..<maxNewTokens {
            let token = sampler(logits)
            if stopIds.contains(token) {
                reply.reason = .stop(token)
                return reply
            }
            reply.tokens.append(token)
            onToken(token)
            reply.pending = token
            if i + 1 == maxNewTokens { return reply }
            if position >= maxContext {
                reply.reason = .context
                return reply
            }
            if shouldStop() {
                reply.reason = .cancelled
                return reply
            }
            logits = try decode(token)
            reply.pending = nil
        }
        return reply
    }

    private func checkRoom(_ count: Int) throws {
        guard ChunkPlan.fits(position: position, count: count, maxContext: maxContext) else {
            throw BundleError("\(position + count) tokens do not fit the context of \(maxContext); "
                + "shorten the prompt or export with a larger --context.")
        }
    }
}
