/// How a prompt is split into forward calls, and the context limit.
public enum ChunkPlan {
    /// Greedily the largest accepted size that fits: for prefill chunks 1...C this is full chunks then
    /// the rest (generate.Runner.chunk_plan); for Core ML's [C, 1] it is prefill calls, then one token
    /// at a time.
    public static func plan(_ count: Int, accepted: [Int]) -> [Int] {
        precondition(accepted.contains(1), "a bundle must accept single-token calls")
        var plan: [Int] = []
        var left = count
        while left > 0 {
            let size = accepted.filter { $0 <= left }.max()!
            plan.append(size)
            left -= size
        }
        return plan
    }

    /// Whether `count` more tokens fit a context of `maxContext` at `position` (past it is an error,
    /// never a wrap).
    public static func fits(position: Int, count: Int, maxContext: Int) -> Bool {
        position + count <= maxContext
    }
}
